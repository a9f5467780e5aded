"""Reading weight files without running code from them: the one loader for classifiers and generative models.

safetensors files hold tensors only. ``.pt``/``.pth``/``.bin`` files are pickles: they are read with
``torch.load(weights_only=True)``, which accepts plain tensors and containers; anything that needs the
full unpickler (a whole pickled ``nn.Module``, custom classes) is refused unless the user passes
``--trust-pickle``, with one message that says why and how to convert the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError

# how the python: classifier adapter takes a converted file (the hint at the end of the classifiers' refusal)
CLASSIFIER_USE = "--classifier python:MODULE:FACTORY@model.safetensors"
# the models' refusal (adm:, i2sb:)
PICKLE_HINT = (
    "it is a full pickle; pass --trust-pickle only if you trust its source (unpickling runs code), "
    "or convert it once to a plain state dict / safetensors"
)


class PickleRefused(UsageError):
    """A pickled file that needs the full unpickler, refused because --trust-pickle was not given (callers without
    that option, such as cfx eval's metric weights, catch it to say something else)."""


def pickle_refused(path: str | Path, what: str = "checkpoint") -> PickleRefused:
    p = str(path)
    return PickleRefused(
        f"{p}: this pickled {what} needs the full unpickler, which can run arbitrary code stored in the "
        "file, so cfx will not load it without --trust-pickle. Pass --trust-pickle only if you trust its "
        "source; better, convert it once to safetensors: python -c \"import torch; from safetensors.torch "
        f"import save_file; m = torch.load('{p}', weights_only=False); "
        f"save_file(getattr(m, 'state_dict', lambda: m)(), 'model.safetensors')\" and use {CLASSIFIER_USE}"
    )


def torch_load(path: str | Path, device: str, trust_pickle: bool, what: str = "checkpoint") -> Any:
    """``torch.load`` that only unpickles arbitrary objects with ``trust_pickle`` (the classifier adapters)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    try:
        return torch.load(str(p), map_location=device, weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        if trust_pickle:
            raise UsageError(f"{p}: cannot unpickle this {what}") from None
        raise pickle_refused(p, what) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise UsageError(f"{p}: not a readable PyTorch {what} ({_first_line(exc)})") from None


def _safetensors(path: Path, device: str, label: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError's import location varies between releases
        raise UsageError(f"{label}: not a readable safetensors file ({_first_line(exc)})") from None


def load_state_dict_file(path: str | Path, device: str, trust_pickle: bool) -> dict:
    """Tensors by name from ``.safetensors`` (always safe) or a pickled state dict (see module doc)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"weights {p}: no such file")
    if p.suffix == ".safetensors":
        return _safetensors(p, device, f"weights {p}")
    obj = torch_load(p, device, trust_pickle, what="state dict")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning-style checkpoints
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise UsageError(f"weights {p}: expected a state dict (tensors by name), got {type(obj).__name__}")
    return obj


def read_checkpoint(path: str | Path, trust_pickle: bool = False, what: str = "checkpoint") -> Any:
    """A model checkpoint (``adm:``, ``i2sb:``) on the CPU: ``.safetensors`` (dict of tensors) or a torch
    ``.pt``/``.pth``/``.bin`` file, read with ``weights_only=True`` unless ``trust_pickle``."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    if path.suffix == ".safetensors":
        return _safetensors(path, "cpu", f"{what} {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and "weights_only" in str(exc):
            raise UsageError(f"{what} {path}: {PICKLE_HINT}") from None
        raise UsageError(f"{what} {path}: cannot be read as a torch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ModuleNotFoundError) as exc:
        raise UsageError(f"{what} {path}: cannot be read as a torch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(
    obj: Any,
    path: str | Path,
    keys: tuple[str, ...] = ("state_dict", "model", "net"),
    strip_prefixes: tuple[str, ...] = ("module.",),
) -> dict:
    """A state dict from a checkpoint that is either one or holds one under a usual key."""
    if not is_state_dict(obj) and isinstance(obj, dict):
        for key in keys:
            if is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not is_state_dict(obj):
        import torch

        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        else:
            found = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise UsageError(f"checkpoint {path}: no state dict found (top-level: {found})")
    for prefix in strip_prefixes:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_into(module, state: dict, path: str | Path, what: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a one-line message naming missing/unexpected keys or shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        raise UsageError(
            f"{what} {path} does not match the network built from the flags: {', '.join(parts)} — check --model-flags"
        )
    module.load_state_dict(state, strict=True)
