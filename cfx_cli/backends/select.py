"""Choosing a forward backend: ``build_backend`` picks one, gates an accelerated build against torch and falls
back to torch with a one-line notice; ``forward_backend`` does that once per module and shape for an explainer."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from cfx_cli.backends import onnx_backend
from cfx_cli.backends.base import BACKENDS, BackendError, ForwardBackend, TorchBackend


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def build_backend(
    module: Any,
    example_inputs: Sequence[Any],
    backend: str = "auto",
    precision: str = "fp32",
    device: str = "cpu",
    *,
    channels_last: bool = False,
    compile: bool = False,
    cache_dir: str | None = None,
    tolerance: float | None = None,
    notice: Callable[[str], None] = _notice,
    label: str = "model",
) -> ForwardBackend:
    """A gated backend for ``module`` (a torch module whose forward maps tensors to one tensor).

    ``example_inputs`` fix everything but the batch size (the ONNX export has a dynamic batch axis, and dynamic
    spatial axes where the network allows). ``auto`` uses an accelerated build only when a validated one is
    already cached (``cfx accelerate`` makes one); otherwise torch, so a default run never starts an export.
    A refused backend prints one line through ``notice`` and torch is returned.
    """
    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    torch_backend = lambda: TorchBackend(module, precision, channels_last, compile)  # noqa: E731
    if backend == "torch":
        return torch_backend()
    kind = "onnx" if backend == "auto" else backend
    try:
        if backend == "auto" and not onnx_backend.cached(module, example_inputs, kind, precision, device, cache_dir):
            return torch_backend()
        return onnx_backend.build(module, example_inputs, kind, precision, device, cache_dir=cache_dir,
                                  tolerance=tolerance, notice=notice, label=label)
    except BackendError as exc:
        notice(f"note: --backend {backend} refused for {label}: {exc}; using torch")
        return torch_backend()


_BUILT: dict[tuple, ForwardBackend] = {}


def forward_backend(context: Any, module: Any, example_inputs: Sequence[Any], label: str = "model") -> ForwardBackend:
    """The backend an explainer should use for forward-only calls of ``module``, from ``context.options``:
    ``backend`` (auto|torch|onnx|tensorrt, default auto), ``backend_precision`` (fp32|fp16|bf16),
    ``channels_last`` and ``compile`` (torch only; true or a torch.compile mode such as ``reduce-overhead``).
    Built once per process and input shape."""
    opts = getattr(context, "options", {}) or {}
    backend = opts.get("backend") or "auto"
    precision = opts.get("backend_precision") or "fp32"
    device = getattr(context, "device", "cpu")
    compile_opt = opts.get("compile") or False
    key = (id(module), backend, precision, device, bool(opts.get("channels_last")), compile_opt,
           tuple(tuple(getattr(t, "shape", ()))[1:] for t in example_inputs))
    if key not in _BUILT:
        _BUILT[key] = build_backend(module, example_inputs, backend, precision, device,
                                    channels_last=bool(opts.get("channels_last")), compile=compile_opt,
                                    label=label)
    return _BUILT[key]
