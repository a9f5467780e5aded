"""I2SB bridge checkpoints (NVlabs/I2SB): an ADM network plus the bridge noise schedule.

I2SB's training writes ``latest.pt`` = ``{"net": state dict (keys ``diffusion_model.*``), "ema": torch_ema state
(``shadow_params``: a list in ``parameters()`` order), "optimizer", "sched"}`` and the run's options as a pickled
``argparse.Namespace`` in ``options.pkl`` beside it. The network is guided-diffusion's 256×256 unconditional
ADM with ``learn_sigma`` off (3 output channels), 6 input channels when ``cond_x1``.

Options are read, in order, from: ``--model-flags`` given as a JSON/TOML file with bridge keys, a JSON sidecar
(``PATH.json`` or ``options.json`` beside the checkpoint; the safe alternative), or ``options.pkl``
(pickle: needs ``--trust-pickle``). The weights are ``net``, as RCSB's code loads them (``CDDB.setup_diffusion``);
the option ``"use_ema": true`` takes the EMA weights instead, as I2SB's own ``sample.py`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cfx_cli.checkpoints import extract_state_dict, load_into, read_checkpoint
from cfx_cli.errors import UsageError
from cfx_cli.models.adm.flags import flags_from_mapping, load_flags
from cfx_cli.models.bridge import BridgeModel
from cfx_cli.models.memory import MemoryOptions, apply_to_adm, resolve_dtype

BRIDGE_KEYS = ("interval", "beta_max", "t0", "T", "cond_x1", "ot_ode", "corrupt", "image_size", "use_ema")
# For options a checkpoint does not declare. β_max 1.0: RCSB's inpainting configs and I2SB's scripts/train.sh for
# every inpainting bridge (``--beta-max 1.0 --ot-ode``); I2SB's argparse default 0.3 is for JPEG/super-resolution.
# A bridge trained with another value declares it (options.pkl or the JSON sidecar; the demo bridge declares 0.3).
BRIDGE_DEFAULTS: dict[str, Any] = {
    "interval": 1000,
    "beta_max": 1.0,
    "t0": 1e-4,
    "T": 1.0,
    "cond_x1": False,
    "ot_ode": True,
    "corrupt": None,
    "use_ema": False,  # RCSB's code loads `net` (I2SB's sample.py: the EMA weights)
}
# I2SB's network: ADM 256×256 unconditional flags (ckpt_util.create_argparser) with learn_sigma off
I2SB_ADM_FLAGS = {
    "attention_resolutions": "32,16,8",
    "channel_mult": "",
    "class_cond": False,
    "dropout": 0.0,
    "image_size": 256,
    "learn_sigma": False,
    "num_channels": 256,
    "num_head_channels": 64,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_res_blocks": 2,
    "resblock_updown": True,
    "use_fp16": False,
    "use_new_attention_order": False,
    "use_scale_shift_norm": True,
}


def _options_from_pickle(path: Path, trust_pickle: bool) -> dict:
    if not trust_pickle:
        raise UsageError(
            f"i2sb: {path} holds the bridge options as a pickle; pass --trust-pickle if you trust it, "
            "or write them as JSON beside the checkpoint (see docs/models.md)"
        )
    import pickle

    try:
        with open(path, "rb") as f:
            opt = pickle.load(f)  # noqa: S301 - the user opted in with --trust-pickle
    except Exception as exc:
        raise UsageError(f"i2sb: cannot unpickle {path} ({type(exc).__name__}: {exc})") from None
    data = vars(opt) if hasattr(opt, "__dict__") else dict(opt)
    return {k: data[k] for k in BRIDGE_KEYS if k in data}


def _read_options_file(path: Path) -> dict:
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise UsageError(f"i2sb options {path}: unreadable ({exc})") from None


def find_options(ckpt: Path, model_flags: str | None, trust_pickle: bool) -> tuple[dict, dict, str]:
    """(bridge options, ADM flag overrides, where they came from)."""
    candidates = []
    if model_flags and Path(model_flags).suffix in (".json", ".toml") and Path(model_flags).is_file():
        candidates.append(Path(model_flags))
    candidates += [ckpt.with_suffix(".json"), ckpt.parent / "options.json"]
    for cand in candidates:
        if cand.is_file():
            data = _read_options_file(cand)
            adm = data.pop("adm_flags", None) or data.pop("model_flags", None) or {}
            bridge = {k: data.pop(k) for k in list(data) if k in BRIDGE_KEYS}
            adm = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **adm}
            return bridge, adm, str(cand)
    pkl = ckpt.parent / "options.pkl"
    if pkl.is_file():
        return _options_from_pickle(pkl, trust_pickle), {}, str(pkl)
    raise UsageError(
        f"i2sb:{ckpt}: no bridge options found: expected {ckpt.with_suffix('.json').name} or "
        "options.json (JSON, safe) or I2SB's options.pkl (with --trust-pickle) beside the checkpoint"
    )


def _state_from_checkpoint(obj: Any, path: Path, use_ema: bool) -> tuple[dict, list | None]:
    shadow = None
    if isinstance(obj, dict) and use_ema and isinstance(obj.get("ema"), dict):
        shadow = obj["ema"].get("shadow_params")
    state = extract_state_dict(obj, path, keys=("net", "state_dict", "model"))
    for prefix in ("module.", "diffusion_model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, shadow


def load_i2sb(
    path: str | Path,
    model_flags: str | None = None,
    device: str = "cpu",
    trust_pickle: bool = False,
    memory: MemoryOptions | None = None,
    use_ema: bool | None = None,
) -> BridgeModel:
    """``use_ema`` None: the options' ``use_ema`` (default False: ``net``, as RCSB's code)."""
    import torch

    from cfx_cli.diffusion.bridge import BridgeSchedule
    from cfx_cli.models.adm.loader import build_unet

    path = Path(path).expanduser()
    memory = memory or MemoryOptions()
    bridge_opts, adm_overrides, opt_source = find_options(path, model_flags, trust_pickle)
    options = {**BRIDGE_DEFAULTS, **bridge_opts}
    use_ema = bool(options["use_ema"]) if use_ema is None else use_ema
    flags = flags_from_mapping(I2SB_ADM_FLAGS, "i2sb defaults")
    if "image_size" in options:
        flags.image_size = int(options["image_size"])
    if options.get("cond_x1"):
        flags.in_channels = 6
    if adm_overrides:
        flags = flags_from_mapping(adm_overrides, opt_source, base=flags)
    if model_flags and not Path(model_flags).is_file():
        flags = load_flags(model_flags, base=flags)  # a flag string overrides the network flags
    state, shadow = _state_from_checkpoint(read_checkpoint(path, trust_pickle, "i2sb checkpoint"), path, use_ema)
    net = build_unet(flags)
    load_into(net, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path, "i2sb checkpoint")
    ema_used = False
    if shadow is not None:
        params = list(net.parameters())
        if len(shadow) != len(params) or any(
            tuple(s.shape) != tuple(p.shape) for s, p in zip(shadow, params, strict=True)
        ):
            raise UsageError(f"i2sb checkpoint {path}: EMA shadow parameters do not match the network")
        with torch.no_grad():
            for p, s in zip(params, shadow, strict=True):
                p.copy_(s.float())
        ema_used = True
    net.eval().requires_grad_(False).to(device)
    precision = "fp16" if flags.use_fp16 and memory.precision == "fp32" else memory.precision
    dtype = resolve_dtype(device, precision, f"i2sb:{path}")
    if dtype != torch.float32:
        net.convert_torso(dtype)
    apply_to_adm(net, memory)
    bridge = BridgeSchedule.from_options(
        int(options["interval"]), float(options["beta_max"]), float(options["t0"]), float(options["T"])
    )
    return BridgeModel(
        net,
        bridge,
        options,
        flags,
        device,
        dtype,
        str(path),
        {"parameters": sum(p.numel() for p in net.parameters()), "ema": ema_used, "options_from": opt_source,
         "beta_max_from": opt_source if "beta_max" in bridge_opts else "default (RCSB's inpainting configs)"},
    )
