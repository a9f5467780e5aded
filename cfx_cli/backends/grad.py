"""Mixed precision for the *differentiated* network calls (``--precision fp16|bf16`` on RCSB's guided bridge steps,
ECED's Alg. 2/3, PGD's and every method's classifier gradients, ACE's differentiated filter).

Forward-only calls get a half-precision copy of the network (:class:`cfx_cli.backends.TorchBackend`); a call whose
gradient is taken cannot, since the user's weights must not change and the gradient must reach fp32 state. Here the
network keeps its fp32 weights and runs under ``torch.autocast`` (convolutions and matmuls in fp16/bf16, reductions
and losses in fp32, gradients flowing back to fp32 inputs). fp16 gradients can underflow (ECED's background MSE is
~1e-4 per pixel), so :meth:`GradPrecision.grad` and :meth:`GradPrecision.scaler` scale the loss for fp16 as
``torch.amp`` does; bf16 has fp32's range and needs none.

Every differentiated callable a method names is gated before use like an accelerated forward build: on a seeded
random input its output under autocast is compared with fp32 elementwise, with the forward parity gate's tolerances
(``cfx_cli.backends.onnx_backend.TOLERANCES``), and its input gradient in norm (``GRADIENT_TOLERANCES``: the direction
the method follows). A callable over tolerance (or an autocast the device lacks) turns the whole method back to fp32
with one line naming it and the measured errors.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cfx_cli.backends.base import PRECISIONS, BackendError, compile_mode, torch_dtype
from cfx_cli.backends.onnx_backend import TOLERANCES, parity_inputs
from cfx_cli.devices import is_out_of_memory

#: fp16 loss scale to start from, and the factor it drops by when a gradient overflows (torch.amp's defaults)
INITIAL_SCALE = 2.0**16
BACKOFF = 0.5
#: > 0 while a loss-scaled fp16 backward may rerun (a plain global, not a context variable: CUDA backward passes run
#: on autograd's device threads)
_RERUNNABLE = 0


def backward_may_rerun() -> bool:
    """Is a backward pass running that :meth:`GradPrecision.grad` may rerun on an overflow? Custom autograd functions
    that free their inner graphs in ``backward`` (``cfx_cli.guide``) keep them only then."""
    return _RERUNNABLE > 0


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
    parity: dict[str, Parity] = field(default_factory=dict)
    scale: float = INITIAL_SCALE

    @property
    def name(self) -> str:
        return "fp32" if self.precision == "fp32" else f"autocast {self.precision}"

    @property
    def dtype(self):
        return torch_dtype(self.precision)

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

        global _RERUNNABLE
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        if self.precision != "fp16":
            return torch.autograd.grad(loss, inputs)
        _RERUNNABLE += 1
        try:
            while True:
                grads = torch.autograd.grad(loss.float() * self.scale, inputs, retain_graph=self.scale > 1.0)
                if all(torch.isfinite(g).all() for g in grads) or self.scale <= 1.0:
                    return tuple(g / self.scale for g in grads)
                self.scale *= BACKOFF
        finally:
            _RERUNNABLE -= 1

    def scaler(self):
        """A ``torch.amp.GradScaler`` for an optimiser loop over differentiated calls (enabled for fp16 only)."""
        import torch

        return torch.amp.GradScaler(self.device_type, init_scale=INITIAL_SCALE, enabled=self.precision == "fp16")


FP32 = GradPrecision()


@dataclass(frozen=True)
class Parity:
    """What the gate measured for one callable: ``output`` = max |Δ| / max |reference| of the output (the forward
    gate's measure), ``gradient`` = ‖Δ‖ / ‖reference‖ of the input gradients (the direction the method follows)."""

    output: float
    gradient: float

    def within(self, output_tol: float, gradient_tol: float) -> bool:
        return self.output <= output_tol and self.gradient <= gradient_tol

    def describe(self) -> str:
        return f"output {self.output:.3g}, gradient {self.gradient:.3g}"


#: the gradients' tolerance (‖Δ‖/‖fp32‖, i.e. the direction: 0.1 ≈ cosine ≥ 0.995). Not the outputs' elementwise
#: one: in half precision a few ReLU/SiLU units near 0 change side and move single gradient elements by a finite
#: step (the demo CNN's input gradient in bf16: 0.027–0.073 elementwise, 0.016–0.041 in norm; bench/grad_precision.py
#: --gate-spread)
GRADIENT_TOLERANCES = {"fp32": 1e-4, "fp16": 0.1, "bf16": 0.1}


def _parity(ref_fn: Callable[..., Any], ref: GradPrecision, got_fn: Callable[..., Any], got: GradPrecision,
            example_inputs: Sequence[Any]) -> Parity:
    """``got_fn`` under ``got`` against ``ref_fn`` under ``ref``, on the same seeded random inputs (1-D inputs are
    timesteps): the output, and the gradient of a fixed random projection of it with respect to every float input.
    Batch 1: the least memory (a gate that runs out of it cannot be helped by the batch worker's split) and the
    shape a compiled network sees most."""
    import torch

    device = next((t.device for t in example_inputs if torch.is_tensor(t)), "cpu")
    inputs = [t.to(device) for t in parity_inputs(example_inputs, batch=1)]
    diff = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.ndim >= 2]

    def run(fn, prec: GradPrecision):
        args = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
        with torch.enable_grad(), prec.autocast():
            out = fn(*args)
        out = out.float()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4321)).to(out.device)
        grads = prec.grad((out * weights).sum(), [args[i] for i in diff]) if diff else ()
        return out.detach(), [g.float() for g in grads]

    (want, want_g), (have, have_g) = run(ref_fn, ref), run(got_fn, got)
    broken = [(r, g) for r, g in zip([want, *want_g], [have, *have_g], strict=True)
              if g.shape != r.shape or not torch.isfinite(g).all()]
    if broken:
        return Parity(float("inf"), float("inf"))
    output = float((have - want).abs().max() / want.abs().max().clamp_min(1e-6))
    gradient = max((float((g - r).norm() / r.norm().clamp_min(1e-12)) for r, g in zip(want_g, have_g, strict=True)),
                   default=0.0)
    return Parity(output, gradient)


def measure_grad_parity(check: GradCheck, precision: str, device_type: str) -> Parity:
    """The gate's measure of ``check`` under autocast ``precision`` against fp32 (:class:`Parity`)."""
    return _parity(check.fn, FP32, check.fn, GradPrecision(precision, device_type), check.example_inputs)


#: decisions by key, each with the checks it was made on: holding them keeps the networks whose ids are in the key
#: alive, so an id can never be reused by another network while its decision is cached (as forward_backend's cache)
_GATED: dict[tuple, tuple[GradPrecision, tuple[GradCheck, ...]]] = {}


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
        return _GATED[cache_key][0]
    out_tol = TOLERANCES[precision] if tolerance is None else tolerance
    grad_tol = GRADIENT_TOLERANCES[precision] if tolerance is None else tolerance
    parity: dict[str, Parity] = {}
    chosen = GradPrecision(precision, device_type, parity)
    for check in checks:
        try:
            measured = measure_grad_parity(check, precision, device_type)
        except RuntimeError as exc:  # an op without a half-precision kernel on this device
            if is_out_of_memory(exc):
                raise  # the batch worker splits the batch and retries; not a reason to refuse the precision
            notice(f"note: --precision {precision} refused for the differentiated calls of {check.label}: "
                   f"{str(exc).splitlines()[0]}; they run in fp32")
            chosen = FP32
            break
        parity[check.label] = measured
        if not measured.within(out_tol, grad_tol):
            notice(f"note: --precision {precision} refused for the differentiated calls of {check.label}: parity "
                   f"gate: {measured.describe()} from fp32 (tolerances {out_tol:g} elementwise, {grad_tol:g} in "
                   "norm); they run in fp32")
            chosen = FP32
            break
    if cache_key is not None:
        _GATED[cache_key] = (chosen, tuple(checks))
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
        candidate = torch.compile(candidate, mode=compile_mode(opts.compile))
    flags = (["channels_last"] if opts.channels_last else []) + \
        ([f"compile {opts.compile}" if isinstance(opts.compile, str) else "compile"] if opts.compile else [])
    try:
        measured = _parity(lambda *a: call(module, *a), FP32, lambda *a: call(candidate, *a), FP32, example_inputs)
    except Exception as exc:  # a compile that fails (no compiler, an unsupported op) is refused, not fatal
        if is_out_of_memory(exc):
            raise  # the batch worker splits the batch and retries
        notice(f"note: {', '.join(flags)} refused for the differentiated calls of {label}: "
               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; they run eagerly")
        candidate = module
    else:
        tol, grad_tol = TOLERANCES["fp32"], GRADIENT_TOLERANCES["fp32"]
        if not measured.within(tol, grad_tol):
            notice(f"note: {', '.join(flags)} refused for the differentiated calls of {label}: parity gate: "
                   f"{measured.describe()} from eager (tolerances {tol:g} elementwise, {grad_tol:g} in norm); "
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
    """What a record says the differentiated calls ran in: ``fp32`` or ``autocast fp16 (gate: output 0.0031,
    gradient 0.012)`` (the largest errors the gate measured), plus the gradient networks' ``channels_last`` /
    ``compile`` where :func:`grad_network` applied them."""
    flags = [f for net in networks for f in _FLAGS.get(id(net), []) if net is not None]
    if amp.parity:
        worst = Parity(max(p.output for p in amp.parity.values()), max(p.gradient for p in amp.parity.values()))
        head = f"{amp.name} (gate: {worst.describe()})"
    else:
        head = amp.name
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
