"""``torchscript:PATH``: a TorchScript archive (``torch.jit.save``) as a white-box classifier.

Metadata travels inside the archive as the extra file ``cfx.json``
(``{"labels": [...], "input_size": [H, W], "mean": [...], "std": [...], "logits": true}``);
spec options (``#size=224&mean=...&std=...&logits=0``) override it. A file that is a plain pickle
(``torch.save(model)``) is loaded only with ``--trust-pickle``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from cfx_cli.checkpoints import torch_load
from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import resolve_options, split_options

METADATA_FILE = "cfx.json"


class TorchScriptAdapter(ClassifierAdapter):
    name = "torchscript"
    schemes = ("torchscript",)
    summary = "TorchScript archive (white-box): torchscript:model.pt[#size=224&mean=..&std=..]"
    capabilities = frozenset({"probabilities", "gradients"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        from cfx_cli.whitebox import build_torch_classifier, torch_options

        base, raw = split_options(spec)
        opts = resolve_options(spec, raw, torch_options())
        path = Path(base.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise UsageError(f"classifier {spec}: {path}: no such file")
        module, meta = _load(path, options)
        return build_torch_classifier(module, spec, options, opts, meta)


def _load(path: Path, options: ClassifierOptions):
    import torch

    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still loadable
            module = torch.jit.load(str(path), map_location=options.device, _extra_files=extra)
    except RuntimeError:
        # Not TorchScript: maybe ``torch.save(model)``, a pickle (refused unless --trust-pickle).
        obj = torch_load(path, options.device, options.trust_pickle, what="model")
        if not isinstance(obj, torch.nn.Module):
            raise UsageError(
                f"{path}: not a TorchScript archive but a {type(obj).__name__} (a state dict?); load weights "
                "with --classifier python:MODULE:FACTORY@WEIGHTS"
            ) from None
        return obj, {}
    meta: dict = {}
    if extra[METADATA_FILE]:
        try:
            meta = json.loads(extra[METADATA_FILE])
        except ValueError:
            raise UsageError(f"{path}: its {METADATA_FILE} metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise UsageError(f"{path}: its {METADATA_FILE} metadata must be a JSON object")
    return module, meta


@hookimpl
def register_classifier_adapters(register):
    register(TorchScriptAdapter)
