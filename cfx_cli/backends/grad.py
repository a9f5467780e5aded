"""Mixed precision for the *differentiated* network calls (``--precision fp16|bf16`` on RCSB's guided bridge steps,
ECED's Alg. 2/3, PGD's and every method's classifier gradients, ACE's differentiated filter).

Forward-only calls get a half-precision copy of the network (:class:`cfx_cli.backends.TorchBackend`); a call whose
gradient is taken cannot, since the user's weights must not change and the gradient must reach fp32 state. Here the
network keeps its fp32 weights and runs under ``torch.autocast`` (convolutions and matmuls in fp16/bf16, reductions
and losses in fp32, gradients flowing back to fp32 inputs). fp16 gradients can underflow (ECED's background MSE is
~1e-4 per pixel), so :meth:`GradPrecision.grad` and :meth:`GradPrecision.scaler` scale the loss for fp16 as
``torch.amp`` does; bf16 has fp32's range and needs none.

Every differentiated callable a method names is gated before use like an accelerated forward build: on seeded random
inputs its output *and its input gradient* under autocast are compared with fp32, with the tolerances of the forward
parity gate (``cfx_cli.backends.onnx_backend.TOLERANCES``). A callable over tolerance (or an autocast the device
lacks) turns the whole method back to fp32 with one line naming it and the measured error.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cfx_cli.backends.base import PRECISIONS, BackendError
from cfx_cli.backends.onnx_backend import TOLERANCES, parity_inputs

#: fp16 loss scale to start from, and the factor it drops by when a gradient overflows (torch.amp's defaults)
INITIAL_SCALE = 2.0**16
BACKOFF = 0.5


@dataclass(frozen=True)
class GradCheck:
    """One differentiated callable of a method: ``fn(*inputs) -> tensor``, and inputs whose shapes (batch aside)
    and dtypes are those of the real calls. Float inputs with ≥ 2 dimensions are the ones differentiated."""

    label: str
    fn: Callable[..., Any]
    example_inputs: tuple[Any, ...]


@dataclass
class GradPrecision:
    """What the differentiated calls of one explainer run in. ``autocast()`` is the context to run them in,
    ``grad`` replaces ``torch.autograd.grad`` (loss scaling in fp16), ``scaler()`` serves optimiser loops;
    ``name`` is what records show (``fp32`` or ``autocast fp16``); ``parity`` the gate's measured errors."""

    precision: str = "fp32"
    device_type: str = "cpu"
    parity: dict[str, float] = field(default_factory=dict)
    scale: float = INITIAL_SCALE

    @property
    def name(self) -> str:
        return "fp32" if self.precision == "fp32" else f"autocast {self.precision}"

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def autocast(self):
        """The context the differentiated calls run in (a no-op for fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad(self, loss, inputs) -> tuple:
        """``torch.autograd.grad(loss, inputs)`` in fp32 units. fp16: the loss is scaled by ``scale`` so that small
        gradients survive the half-precision backward; on an overflow the scale drops and the backward reruns."""
        import torch

        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        if self.precision != "fp16":
            return torch.autograd.grad(loss, inputs)
        while True:
            grads = torch.autograd.grad(loss.float() * self.scale, inputs, retain_graph=self.scale > 1.0)
            if all(torch.isfinite(g).all() for g in grads) or self.scale <= 1.0:
                return tuple(g / self.scale for g in grads)
            self.scale *= BACKOFF

    def scaler(self):
        """A ``torch.amp.GradScaler`` for an optimiser loop over differentiated calls (enabled for fp16 only)."""
        import torch

        return torch.amp.GradScaler(self.device_type, init_scale=INITIAL_SCALE, enabled=self.precision == "fp16")


FP32 = GradPrecision()


def _relative_error(ref_fn: Callable[..., Any], ref: GradPrecision, got_fn: Callable[..., Any], got: GradPrecision,
                    example_inputs: Sequence[Any]) -> float:
    """max |Δ| / max |reference| over the output and each differentiated input's gradient, ``got_fn`` under ``got``
    against ``ref_fn`` under ``ref``, on the same seeded random inputs (batch 2; 1-D inputs are timesteps)."""
    import torch

    device = next((t.device for t in example_inputs if torch.is_tensor(t)), "cpu")
    inputs = [t.to(device) for t in parity_inputs(example_inputs)]
    diff = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.ndim >= 2]

    def run(fn, prec: GradPrecision):
        args = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
        with torch.enable_grad(), prec.autocast():
            out = fn(*args)
        out = out.float()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4321)).to(out.device)
        grads = prec.grad((out * weights).sum(), [args[i] for i in diff]) if diff else ()
        return [out.detach(), *[g.float() for g in grads]]

    want, have = run(ref_fn, ref), run(got_fn, got)
    err = 0.0
    for r, g in zip(want, have, strict=True):
        if g.shape != r.shape or not torch.isfinite(g).all():
            return float("inf")
        err = max(err, float((g - r).abs().max() / r.abs().max().clamp_min(1e-6)))
    return err


def measure_grad_parity(check: GradCheck, precision: str, device_type: str) -> float:
    """max relative error (max |Δ| / max |fp32|) of the output and of each differentiated input's gradient under
    autocast ``precision``, against fp32 on the same seeded random inputs (batch 2; 1-D inputs are timesteps)."""
    return _relative_error(check.fn, FP32, check.fn, GradPrecision(precision, device_type), check.example_inputs)


_GATED: dict[tuple, GradPrecision] = {}


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def grad_precision(context: Any, checks: Sequence[GradCheck], key: Any = None,
                   notice: Callable[[str], None] = _notice, tolerance: float | None = None) -> GradPrecision:
    """The precision for an explainer's differentiated calls, from ``context.options.backend_precision``: fp32, or
    autocast fp16/bf16 once every callable in ``checks`` passes the gate (else fp32, with one line through
    ``notice``). ``key`` (e.g. the explainer's network ids and input shapes) caches the decision per process."""
    precision = context.options.backend_precision
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return FP32
    device_type = str(getattr(context, "device", "cpu")).split(":")[0]
    cache_key = (key, precision, device_type, tolerance) if key is not None else None
    if cache_key is not None and cache_key in _GATED:
        return _GATED[cache_key]
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    parity: dict[str, float] = {}
    chosen = GradPrecision(precision, device_type, parity)
    for check in checks:
        try:
            err = measure_grad_parity(check, precision, device_type)
        except RuntimeError as exc:  # an op without a half-precision kernel on this device
            notice(f"note: --precision {precision} refused for the differentiated calls of {check.label}: "
                   f"{str(exc).splitlines()[0]}; they run in fp32")
            chosen = FP32
            break
        parity[check.label] = err
        if not err <= tol:
            notice(f"note: --precision {precision} refused for the differentiated calls of {check.label}: parity "
                   f"gate: output or input gradient differs from fp32 by {err:.3g} (max relative error; tolerance "
                   f"{tol:g}); they run in fp32")
            chosen = FP32
            break
    if cache_key is not None:
        _GATED[cache_key] = chosen
    return chosen


_NETWORKS: dict[tuple, Any] = {}


def grad_network(context: Any, module: Any, call: Callable[..., Any], example_inputs: Sequence[Any], label: str,
                 notice: Callable[[str], None] = _notice) -> Any:
    """``module`` as the method should take gradients through it, from ``context.options``: itself (the default), or
    a channels_last copy (``--channels-last``; the loaded weights are not touched, the copy costs their memory) and
    ``torch.compile`` (``--compile [--compile-mode M]``; AOTAutograd compiles the backward too, ``reduce-overhead``
    records CUDA graphs). ``call(net, *inputs) -> tensor`` is how the method calls it; the result is gated against
    ``module`` itself in fp32 (output and input gradient, the fp32 tolerance) and refused with one line if it
    differs. Cached per module, options and input shape."""
    import torch

    opts = context.options
    if not (opts.channels_last or opts.compile):
        return module
    key = (id(module), opts.channels_last, opts.compile, tuple(tuple(getattr(t, "shape", ()))[1:] for t in
                                                               example_inputs))
    if key in _NETWORKS:
        return _NETWORKS[key]
    candidate = _channels_last(module) if opts.channels_last else module
    if opts.compile:
        mode = opts.compile if isinstance(opts.compile, str) and opts.compile not in ("default", "") else None
        candidate = torch.compile(candidate, mode=mode)
    flags = (["channels_last"] if opts.channels_last else []) + \
        ([f"compile {opts.compile}" if isinstance(opts.compile, str) else "compile"] if opts.compile else [])
    try:
        err = _relative_error(lambda *a: call(module, *a), FP32, lambda *a: call(candidate, *a), FP32, example_inputs)
    except Exception as exc:  # a compile that fails (no compiler, an unsupported op) is refused, not fatal
        notice(f"note: {', '.join(flags)} refused for the differentiated calls of {label}: "
               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; they run eagerly")
        candidate = module
    else:
        tol = TOLERANCES["fp32"]
        if not err <= tol:
            notice(f"note: {', '.join(flags)} refused for the differentiated calls of {label}: parity gate: output "
                   f"or input gradient differs from eager by {err:.3g} (max relative error; tolerance {tol:g}); "
                   "they run eagerly")
            candidate = module
    _NETWORKS[key] = candidate
    if candidate is not module:
        _FLAGS[id(candidate)] = flags
    return candidate


_FLAGS: dict[int, list[str]] = {}


def grad_model(context: Any, model: Any, attribute: str, call: Callable[..., Any], example_inputs: Sequence[Any],
               label: str) -> Any:
    """A model dataclass (``PixelModel``, ``BridgeModel``, ``LatentModel``) whose network ``attribute`` (``net``,
    ``unet``) is :func:`grad_network`'s: a copy of the dataclass when ``--channels-last`` / ``--compile`` applied,
    else ``model`` itself. The loaded model is never changed (other calls, e.g. forward-only ones, keep using it)."""
    import dataclasses

    net = getattr(model, attribute)
    wrapped = grad_network(context, net, call, example_inputs, label)
    return model if wrapped is net else dataclasses.replace(model, **{attribute: wrapped})


def describe(amp: GradPrecision, *networks: Any) -> str:
    """What a record says the differentiated calls ran in: ``fp32`` or ``autocast fp16 (gate 0.0031)`` (the largest
    error the gate measured), plus the gradient networks' ``channels_last`` / ``compile`` where :func:`grad_network`
    applied them."""
    flags = [f for net in networks for f in _FLAGS.get(id(net), []) if net is not None]
    head = f"{amp.name} (gate {max(amp.parity.values()):.2g})" if amp.parity else amp.name
    return ", ".join([head, *dict.fromkeys(flags)])


def _channels_last(module: Any) -> Any:
    """A channels_last copy of ``module`` that brings its 4-D float inputs to channels_last; other attributes (a
    diffusers model's ``config``, ``dtype``) are the module's."""
    import copy

    import torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = copy.deepcopy(net).to(memory_format=torch.channels_last)

        def forward(self, *args, **kwargs):
            def cl(t):
                if torch.is_tensor(t) and t.is_floating_point() and t.ndim == 4:
                    return t.contiguous(memory_format=torch.channels_last)
                return t

            return self.net(*[cl(a) for a in args], **{k: cl(v) for k, v in kwargs.items()})

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("net"), name)

    return ChannelsLast(module)
