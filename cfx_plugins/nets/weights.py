"""Finding and reading metric weights: local files only, named by ``--set KEY=PATH`` or an
environment variable; a missing file is a one-line :class:`MetricUnavailable` naming the file and
where it is published."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfx_cli.checkpoints import PickleRefused, load_state_dict_file
from cfx_cli.errors import MetricUnavailable, UsageError


@dataclass(frozen=True)
class WeightsSpec:
    key: str  # --set KEY=PATH
    env: str  # environment variable
    filename: str  # the published file name
    published: str  # where it is published


def option(context, key: str, env: str | None = None, default: Any = None) -> Any:
    """A metric option: ``cfx eval --set KEY=VALUE`` first, then the environment variable, then default."""
    value = (context.options or {}).get(key)
    if value is None and env:
        value = os.environ.get(env)
    return default if value is None or value == "" else value


def int_option(context, key: str, env: str | None, default: int, minimum: int = 1) -> int:
    raw = option(context, key, env, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise MetricUnavailable(f"{key}={raw!r}: expected an integer") from None
    if value < minimum:
        raise MetricUnavailable(f"{key}={value}: must be at least {minimum}")
    return value


def resolve(context, spec: WeightsSpec) -> Path:
    raw = option(context, spec.key, spec.env)
    if not raw:
        raise MetricUnavailable(
            f"needs {spec.filename} (published at {spec.published}); "
            f"give its local path with --set {spec.key}=PATH or {spec.env}"
        )
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise MetricUnavailable(
            f"{path}: no such file (expected {spec.filename}, published at {spec.published})"
        )
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain containers of numpy arrays (e.g. the VGGFace2 ``.pkl`` weights) and
    refuses every other global, so no code from the file runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles carry raw bytes (Python 2 era files)
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")


def load_state_dict(path: Path) -> dict[str, Any]:
    """Tensors by name from ``.safetensors`` or a torch file (``weights_only``), read by the one checkpoint reader
    (``cfx_cli.checkpoints``), or from a numpy-array pickle (the VGGFace2 ``.pkl``) through a numpy-only
    unpickler. Any failure is a :class:`MetricUnavailable` naming the file."""
    import torch

    if not path.name.lower().endswith(".pkl"):
        try:
            return dict(load_state_dict_file(path, "cpu", trust_pickle=False))
        except PickleRefused:  # cfx eval has no --trust-pickle: metric weights are never fully unpickled
            raise MetricUnavailable(f"{path}: cannot read weights (a full pickle, which cfx eval never unpickles; "
                                    "convert it once to safetensors)") from None
        except UsageError as exc:
            why = str(exc).removeprefix(f"weights {path}: ")
            raise MetricUnavailable(f"{path}: cannot read weights ({why})") from None
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise MetricUnavailable(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise MetricUnavailable(f"{path}: expected a state dict, found {type(raw).__name__}")
    return {k: torch.from_numpy(v.copy()) if hasattr(v, "dtype") else v for k, v in raw.items()}


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module, state: dict[str, Any], path: Path, *, ignore: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``: every parameter and buffer must be present with the right shape
    (``num_batches_tracked`` may be absent, as in files written by old torch); extra keys starting with
    one of ``ignore`` are allowed (e.g. the classifier head that feature extraction does not use)."""
    import torch

    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own and not k.startswith(ignore)]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys, e.g. {missing[0]}")
        if extra:
            detail.append(f"unexpected {len(extra)} keys, e.g. {extra[0]}")
        raise MetricUnavailable(f"{path}: not the expected weights ({'; '.join(detail)})")
    with torch.no_grad():
        for k, t in own.items():
            if k not in state:
                continue
            src = state[k]
            if not isinstance(src, torch.Tensor):
                src = torch.as_tensor(src)
            if tuple(src.shape) != tuple(t.shape):
                raise MetricUnavailable(
                    f"{path}: {k} has shape {tuple(src.shape)}, expected {tuple(t.shape)}"
                )
            t.copy_(src.to(t.dtype))
    module.eval()
