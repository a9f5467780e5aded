"""The backend interface: ``ForwardBackend(*tensors) -> tensor`` for forward-only network calls, the torch
backend, and ``build_backend`` / ``forward_backend``, which pick a backend, gate it and fall back to torch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

BACKENDS = ("auto", "torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


class BackendError(Exception):
    """A backend cannot be used here (library or hardware missing, export failed, provider fell back)."""


class ParityError(BackendError):
    """An accelerated build disagrees with torch beyond the tolerance; carries the measured error."""

    def __init__(self, message: str, error: float, tolerance: float) -> None:
        super().__init__(message)
        self.error = error
        self.tolerance = tolerance


class ForwardBackend:
    """A forward-only callable over tensors. ``name`` is what run records show (e.g. ``onnx (CPU, fp32)``)."""

    name = "base"
    #: the module's own eager fp32 call: callers may call the module itself (bit-identical, no copy)
    plain = False

    def __call__(self, *inputs: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class TorchBackend(ForwardBackend):
    """Eager torch (the reference): fp32 by default, optional fp16/bf16 copy, channels_last, ``torch.compile``."""

    def __init__(self, module: Any, precision: str = "fp32", channels_last: bool = False,
                 compile: bool | str = False) -> None:
        import copy

        import torch

        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        param = next(iter(module.parameters()), None)
        own = param.dtype if param is not None else torch.float32
        if own != self.dtype or channels_last:  # never mutate the caller's module
            module = copy.deepcopy(module).to(self.dtype)
            if channels_last:
                module = module.to(memory_format=torch.channels_last)
        self.module = module.eval()
        self.channels_last = channels_last
        # compile=True is torch.compile's default mode; a mode name (e.g. "reduce-overhead": CUDA graphs, which
        # removes the per-kernel launch cost that dominates a UNet call on a fast GPU) is passed through
        mode = compile if isinstance(compile, str) and compile not in ("default", "") else None
        self.fn = torch.compile(self.module, mode=mode) if compile else self.module
        self.graphs = mode in ("reduce-overhead", "max-autotune")
        flags = [precision] + (["channels_last"] if channels_last else []) + \
            ([f"compile {mode}" if mode else "compile"] if compile else [])
        self.name = f"torch ({', '.join(flags)})"
        self.plain = precision == "fp32" and not channels_last and not compile

    def __call__(self, *inputs):
        import torch

        args = []
        for t in inputs:
            if torch.is_tensor(t) and t.is_floating_point() and t.ndim >= 2:
                t = t.to(self.dtype)
                if self.channels_last and t.ndim == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
            args.append(t)
        with torch.no_grad():
            out = self.fn(*args)
        # CUDA-graph outputs live in a static buffer that the next replay overwrites
        return out.clone().float() if self.graphs else out.float()


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
    from cfx_cli.backends import onnx_backend

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
    """The backend an explainer should use for forward-only calls of ``module``, from ``context.options`` (a
    :class:`cfx_cli.explainers.RunOptions`): ``backend`` (auto|torch|onnx|tensorrt), ``backend_precision``
    (fp32|fp16|bf16), ``channels_last`` and ``compile`` (torch only; true or a torch.compile mode such as
    ``reduce-overhead``). Built once per process and input shape."""
    opts = context.options
    device = context.device
    key = (id(module), opts.backend, opts.backend_precision, device, opts.channels_last, opts.compile,
           tuple(tuple(getattr(t, "shape", ()))[1:] for t in example_inputs))
    if key not in _BUILT:
        _BUILT[key] = build_backend(module, example_inputs, opts.backend, opts.backend_precision, device,
                                    channels_last=opts.channels_last, compile=opts.compile, label=label)
    return _BUILT[key]
