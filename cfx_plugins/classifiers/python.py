"""``python:MODULE:FACTORY[@WEIGHTS]``: a model built by your own Python code (white-box).

``MODULE`` is an importable module name or a path to a ``.py`` file; ``FACTORY`` is called without
arguments and returns a ``torch.nn.Module`` mapping (N, 3, H, W) images to (N, K) logits. The optional
``@WEIGHTS`` is a ``.safetensors`` state dict (a pickled ``.pt`` state dict is read with
``weights_only=True``; anything else needs ``--trust-pickle``). The module may carry ``labels`` and
``input_size`` attributes; spec options (``#size=224&mean=...&std=...&logits=0``) set preprocessing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from cfx_cli.checkpoints import load_state_dict_file
from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import resolve_options, split_options


class PythonAdapter(ClassifierAdapter):
    name = "python"
    schemes = ("python",)
    summary = "your nn.Module (white-box): python:MODULE:FACTORY[@WEIGHTS.safetensors][#size=..]"
    capabilities = frozenset({"probabilities", "gradients"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        import torch

        from cfx_cli.whitebox import build_torch_classifier, torch_options

        base, raw = split_options(spec)
        opts = resolve_options(spec, raw, torch_options())
        target, _, weights = base.split(":", 1)[1].partition("@")
        module_name, sep, factory_name = target.rpartition(":")
        if not sep or not module_name or not factory_name:
            raise UsageError(f"classifier {spec}: expected python:MODULE:FACTORY[@WEIGHTS.safetensors]")
        factory = getattr(_import(module_name, spec), factory_name, None)
        if not callable(factory):
            raise UsageError(f"classifier {spec}: {module_name} has no callable {factory_name!r}")
        try:
            model = factory()
        except Exception as exc:
            why = f"classifier {spec}: {factory_name}() failed: {type(exc).__name__}: {exc}"
            raise UsageError(why) from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"classifier {spec}: {factory_name}() returned {type(model).__name__}, "
                             "expected a torch.nn.Module")
        if weights:
            state = load_state_dict_file(Path(weights).expanduser(), "cpu", options.trust_pickle)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                detail = " ".join(str(exc).split())[:300]
                raise UsageError(f"weights {weights} do not fit {factory_name}(): {detail}") from None
        meta = {k: getattr(model, k) for k in ("labels", "input_size") if getattr(model, k, None) is not None}
        return build_torch_classifier(model, spec, options, opts, meta)


def _import(name: str, spec: str):
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"classifier {spec}: {name}: no such file")
        mod_name = f"cfx_user_model_{abs(hash(str(path)))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            why = f"classifier {spec}: importing {name} failed: {type(exc).__name__}: {exc}"
            raise UsageError(why) from None
        return module
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"classifier {spec}: cannot import module {name!r} ({exc})") from None


@hookimpl
def register_classifier_adapters(register):
    register(PythonAdapter)
