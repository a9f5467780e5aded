"""The backend interface: ``ForwardBackend(*tensors) -> tensor`` for forward-only network calls, its errors and
the torch backend (the reference). Choosing a backend is :mod:`cfx_cli.backends.select`."""

from __future__ import annotations

from typing import Any

BACKENDS = ("auto", "torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


def torch_dtype(precision: str):
    """``fp32``/``fp16``/``bf16`` → the torch dtype."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def compile_mode(compile: bool | str) -> str | None:
    """The ``torch.compile`` mode of a ``--compile [--compile-mode M]`` option: None for torch's default."""
    return compile if isinstance(compile, str) and compile not in ("default", "") else None


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
        self.dtype = torch_dtype(precision)
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
        mode = compile_mode(compile)
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
