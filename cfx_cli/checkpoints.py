"""Loading PyTorch weights without running code from the file.

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


def pickle_refused(path: str | Path, what: str = "checkpoint") -> UsageError:
    p = str(path)
    return UsageError(
        f"{p}: this pickled {what} needs the full unpickler, which can run arbitrary code stored in the "
        "file, so cfx will not load it without --trust-pickle. Pass --trust-pickle only if you trust its "
        "source; better, convert it once to safetensors: python -c \"import torch; from safetensors.torch "
        f"import save_file; m = torch.load('{p}', weights_only=False); "
        "save_file(getattr(m, 'state_dict', lambda: m)(), 'model.safetensors')\" and use "
        "--classifier python:MODULE:FACTORY@model.safetensors"
    )


def torch_load(path: str | Path, device: str, trust_pickle: bool, what: str = "checkpoint") -> Any:
    """``torch.load`` that only unpickles arbitrary objects with ``trust_pickle``."""
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


def load_state_dict_file(path: str | Path, device: str, trust_pickle: bool) -> dict:
    """Tensors by name from ``.safetensors`` (always safe) or a pickled state dict (see module doc)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"weights {p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"weights {p}: not a readable safetensors file ({_first_line(exc)})") from None
    obj = torch_load(p, device, trust_pickle, what="state dict")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning-style checkpoints
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise UsageError(f"weights {p}: expected a state dict (tensors by name), got {type(obj).__name__}")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
