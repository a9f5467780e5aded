"""FLOP counting and the machine's measured fp32 matmul peak, shared by the ``bench/`` scripts.

* :func:`count_flops` runs a callable under ``torch.utils.flop_counter.FlopCounterMode`` and returns the FLOPs of
  every matmul / convolution / attention it dispatched — forward, and backward too when the callable takes
  gradients (``autograd.grad`` / ``.backward()`` run the backward kernels under the same mode). One multiply-add
  is 2 FLOPs. Elementwise work (normalisation, activations, the diffusion update arithmetic) is *not* counted:
  the number is a lower bound dominated by the dense layers, the same convention as torch's own counter.
  torch's counter has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention`` runs
  on here (it would count 0 for every attention layer); we register torch's own SDPA formulas for it.
* :func:`count_flops_backward` is the forward + backward count of ``fn(*inputs)`` w.r.t. its float inputs.
* :func:`measure_sgemm_peak` is the *achievable* fp32 matmul (sgemm) rate of this machine with the current torch
  thread count: the best median over a few large square ``torch.mm`` sizes. It is a measurement, not a datasheet
  number; on a CPU shared with other jobs it moves with the load, so scripts measure it in the same run.
* :func:`share_of_peak` = achieved FLOP/s ÷ that peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def _cpu_sdpa(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                       **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    """The CPU SDPA kernels (absent from torch's registry), counted with torch's own SDPA formulas (FlopCounterMode
    passes tensor arguments to these as shapes)."""
    import torch

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker: every FLOP goes to "Global" (all we read). The real
    tracker's backward hooks break ``torch.autograd.grad`` w.r.t. leaf inputs (RCSB's and PGD's gradients:
    "A leaf node was passed to _will_engine_execute_node")."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """(FLOPs, result) of ``fn(*args, **kwargs)``: matmul/conv/attention FLOPs of everything it ran (forward
    and any backward it took)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    counter.mod_tracker = _GlobalOnly()  # totals only: no per-module hooks
    with counter as mode:
        result = fn(*args, **kwargs)
    return int(mode.get_total_flops()), result


def count_flops_backward(fn: Callable[..., Any], inputs: Sequence[Any]) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of ``fn(*inputs)``, the backward being the gradient of the
    output's sum w.r.t. every floating-point tensor input and every parameter that requires grad."""
    import torch

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    fwd, _ = count_flops(forward)

    def both():
        leaves = [t.detach().requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
                  for t in inputs]
        with torch.enable_grad():
            out = fn(*leaves)
            out = getattr(out, "sample", out)
            out.float().sum().backward()

    total, _ = count_flops(both)
    return fwd, total


@dataclass
class Peak:
    flops_per_s: float  # the best size's median
    threads: int
    by_size: dict[int, float]  # n -> median FLOP/s of an n×n @ n×n fp32 matmul

    def describe(self) -> str:
        sizes = ", ".join(f"{n}: {v / 1e9:.1f}" for n, v in self.by_size.items())
        return (f"measured fp32 matmul peak {self.flops_per_s / 1e9:.1f} GFLOP/s at {self.threads} thread(s) "
                f"(achievable sgemm rate, torch.mm median per size, best size; GFLOP/s by size: {sizes})")


def measure_sgemm_peak(sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 5,
                       min_seconds: float = 0.05) -> Peak:
    """The achievable fp32 matmul rate with torch's current thread count: for each n, the median over
    ``repeats`` timings of ``torch.mm`` on n×n fp32 matrices (2n³ FLOPs; each timing loops until it lasts at
    least ``min_seconds``); the best size's median is the peak."""
    import torch

    g = torch.Generator().manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up (packing buffers, thread pool)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        loops = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-9)))
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                torch.mm(a, b, out=out)
            rates.append(2 * n**3 * loops / (time.perf_counter() - t0))
        by_size[n] = statistics.median(rates)
    return Peak(max(by_size.values()), torch.get_num_threads(), by_size)


def share_of_peak(flops: float, seconds: float, peak: float | Peak) -> float:
    """Achieved FLOP/s (``flops`` / ``seconds``) as a fraction of ``peak`` (FLOP/s, or a :class:`Peak`)."""
    rate = peak.flops_per_s if isinstance(peak, Peak) else float(peak)
    if seconds <= 0 or rate <= 0:
        raise ValueError("seconds and peak must be positive")
    return flops / seconds / rate


def fmt_flops(flops: float) -> str:
    """1.23e9 -> '1.23 G' (FLOPs with an SI prefix)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} "
