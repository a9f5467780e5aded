"""Reading weight files safely: safetensors, or ``torch.load(weights_only=True)`` unless ``--trust-pickle``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError

PICKLE_HINT = (
    "it is a full pickle; pass --trust-pickle only if you trust its source (unpickling runs code), "
    "or convert it once to a plain state dict / safetensors"
)


def read_checkpoint(path: str | Path, trust_pickle: bool = False, what: str = "checkpoint") -> Any:
    """Load a ``.safetensors`` file (dict of tensors) or a torch ``.pt``/``.pth``/``.bin`` file.

    Without ``trust_pickle`` torch files are read with ``weights_only=True``: plain state dicts (tensors, numbers,
    lists, dicts) load; arbitrary pickled objects are refused with one line saying so.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorsError's import location varies between releases
            raise UsageError(f"{what} {path}: not a readable safetensors file ({exc})") from None
    import pickle

    import torch

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
    return text[0] if text else type(exc).__name__


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
