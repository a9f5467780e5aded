"""``hit:CONFIG@WEIGHTS``: a HiT (Hindered Transformer, thesis ch. 6) as a white-box classifier; ``demo:hit-digits``.

``CONFIG`` is one of the authors' configs by name (:data:`BUILTIN_CONFIGS`: hit-s, hit-b, hit-s-no-pool,
hit-b-no-pool, 1000 ImageNet classes) or a ``.yaml``/``.json`` file in the authors' format (``model: {name,
params}``), optionally with cfx's ``labels``, ``mean`` and ``std``. ``WEIGHTS`` is a ``.safetensors`` state dict
or the authors' ``.pth`` checkpoint (its ``model`` entry is used; a pickle that needs more than tensors is
refused without ``--trust-pickle``). Spec options: ``#classes=N`` (a fine-tuned head), ``#mean=..&std=..``
(default: the config's, else ImageNet's, which the authors train with). Inputs are resized to the config's
``image_size``. The model is :mod:`cfx_plugins.classifiers.hit.model`; its maps feed ``--region hit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cfx_cli.checkpoints import load_state_dict_file, torch_load
from cfx_cli.classifiers import IMAGENET_MEAN, IMAGENET_STD, Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.demo import DEMO_DIR as _DEMO_ROOT
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import Option, resolve_options, split_options

#: ``demo:hit-digits``: written by scripts/train_demo_hit.py
DEMO_DIR = _DEMO_ROOT / "models" / "hit"
DEMO_CONFIG = "config.json"
DEMO_WEIGHTS = "hit-digits.safetensors"


_COMMON = {"image_size": 224, "mlp_ratio": 4, "dropout": 0.0, "attention_dropout": 0.2, "mlp_dropout": 0.0,
           "drop_path": 0.0, "num_classes": 1000, "use_pos_tokens": True, "block_version": "hit"}
#: the authors' configs/hit-*.yaml (model.name, model.params)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "hit-s": {"name": "hit", "params": {**_COMMON, "blocks": [4, 4, 4], "num_heads": 6,
                                        "block_dims": [384, 384, 384], "patch_size": 8}},
    "hit-b": {"name": "hit", "params": {**_COMMON, "blocks": [4, 4, 4], "num_heads": 12,
                                        "block_dims": [768, 768, 768], "patch_size": 8}},
    "hit-s-no-pool": {"name": "hit-no-pool", "params": {**_COMMON, "num_layers": 12, "num_heads": 6,
                                                        "hidden_dim": 384, "patch_size": 16}},
    "hit-b-no-pool": {"name": "hit-no-pool", "params": {**_COMMON, "num_layers": 12, "num_heads": 12,
                                                        "hidden_dim": 768, "patch_size": 16}},
}
_CONFIG_KEYS = {"model", "labels", "mean", "std"}


def read_config(source: str) -> dict[str, Any]:
    """A built-in config name or a YAML/JSON file → ``{"model": {name, params}, "labels"?, "mean"?, "std"?}``."""
    if source in BUILTIN_CONFIGS:
        return {"model": json.loads(json.dumps(BUILTIN_CONFIGS[source]))}
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"HiT config {source}: no such file, and not one of {', '.join(BUILTIN_CONFIGS)}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"HiT config {path}: reading YAML needs PyYAML (pip install pyyaml), or give "
                                 "the same content as JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"HiT config {path}: not readable ({str(exc).splitlines()[0][:150]})") from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml at module level
        raise UsageError(f"HiT config {path}: not valid YAML ({str(exc).splitlines()[0][:150]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UsageError(f"HiT config {path}: expected a 'model' section with 'name' and 'params' (the authors' "
                         "configs/hit-*.yaml format)")
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise UsageError(f"HiT config {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_CONFIG_KEYS))})")
    return data


def load_hit(config_source: str, weights: str | Path, spec: str, options: ClassifierOptions,
             overrides: dict[str, Any] | None = None) -> Classifier:
    """Build the HiT of ``config_source``, load ``weights`` and wrap it (normalisation in front) as a classifier."""
    import torch

    from cfx_cli.whitebox import Normalized, TorchModuleClassifier
    from cfx_plugins.classifiers.hit.model import HiT, HiTConfig

    overrides = overrides or {}
    data = read_config(config_source)
    model_section = data["model"]
    params = dict(model_section.get("params") or {})
    if overrides.get("classes"):
        params["num_classes"] = int(overrides["classes"])
    try:
        config = HiTConfig.from_authors(str(model_section.get("name")), params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"HiT config {config_source}: {exc}") from None
    model = HiT(config)
    state = _read_state(Path(weights).expanduser(), options.trust_pickle)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UsageError(f"weights {weights} do not fit HiT config {config_source}: {detail}") from None
    mean = overrides.get("mean") or data.get("mean") or IMAGENET_MEAN
    std = overrides.get("std") or data.get("std") or IMAGENET_STD
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or (name == "std" and any(float(v) == 0 for v in values)):
            raise UsageError(f"classifier {spec}: {name} must be 3 numbers{' (none 0)' if name == 'std' else ''}")
    labels = options.labels or data.get("labels") or [str(i) for i in range(config.num_classes)]
    if len(labels) != config.num_classes:
        raise UsageError(f"classifier {spec}: {len(labels)} labels for a head of {config.num_classes} classes")
    module = Normalized(model, [float(v) for v in mean], [float(v) for v in std]).to(torch.float32)
    return TorchModuleClassifier(module, list(labels), (config.image_size, config.image_size), spec=spec,
                                 device=options.device)


def _read_state(path: Path, trust_pickle: bool) -> dict:
    if path.suffix == ".safetensors":
        state = load_state_dict_file(path, "cpu", trust_pickle)
    else:
        obj = torch_load(path, "cpu", trust_pickle, what="HiT checkpoint")
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # the authors' {"model": ..., ...}
            obj = obj["model"]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UsageError(f"weights {path}: expected a state dict or the authors' checkpoint, got "
                             f"{type(obj).__name__}")
        state = obj
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_demo(spec: str, options: ClassifierOptions) -> Classifier:
    """``demo:hit-digits``: the committed HiT trained on the demo digits."""
    weights = DEMO_DIR / DEMO_WEIGHTS
    if not weights.is_file():
        raise UsageError(f"demo:hit-digits: {weights} is missing (train it with scripts/train_demo_hit.py)")
    return load_hit(str(DEMO_DIR / DEMO_CONFIG), weights, spec, options)


class HiTAdapter(ClassifierAdapter):
    name = "hit"
    schemes = ("hit",)
    summary = ("HiT, the Hindered Transformer (white-box, exact per-patch maps): hit:CONFIG@WEIGHTS, CONFIG = "
               "hit-s|hit-b|hit-s-no-pool|hit-b-no-pool or a YAML/JSON file")
    capabilities = frozenset({"probabilities", "gradients"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        base, raw = split_options(spec)
        opts = resolve_options(spec, raw, (
            Option("classes", "int", None, "number of classes of the head (default: the config's)"),
            Option("mean", "floats", None, "per-channel mean of the normalisation (default: config, else ImageNet)"),
            Option("std", "floats", None, "per-channel std of the normalisation (default: config, else ImageNet)"),
        ))
        config, sep, weights = base.split(":", 1)[1].partition("@")
        if not config or not sep or not weights:
            raise UsageError(f"classifier {spec}: expected hit:CONFIG@WEIGHTS (CONFIG: "
                             f"{', '.join(BUILTIN_CONFIGS)} or a .yaml/.json file)")
        if opts.get("classes") == 0:
            raise UsageError(f"classifier {spec}: classes must be at least 1")
        return load_hit(config, weights, spec, options, opts)


@hookimpl
def register_classifier_adapters(register):
    register(HiTAdapter)
