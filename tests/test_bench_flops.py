"""bench/flops.py: the FLOP counter against hand-computed counts, and the peak / share-of-peak helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _flops_module():
    spec = importlib.util.spec_from_file_location("bench_flops", Path(__file__).parents[1] / "bench" / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


flops = _flops_module()

N, C_IN, C_OUT, H, W, K = 2, 3, 5, 8, 8, 3
HIDDEN, CLASSES = 7, 4


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(C_IN, C_OUT, K, padding=1),  # 8×8 → 8×8
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(C_OUT * H * W, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    ).eval()


def _forward_by_hand() -> int:
    conv = 2 * N * C_OUT * H * W * C_IN * K * K  # one multiply-add (2 FLOPs) per output pixel and kernel tap
    lin1 = 2 * N * (C_OUT * H * W) * HIDDEN
    lin2 = 2 * N * HIDDEN * CLASSES
    return conv + lin1 + lin2


def test_forward_flops_match_the_hand_count():
    net = _net()
    x = torch.rand(N, C_IN, H, W)
    with torch.no_grad():
        got, out = flops.count_flops(net, x)
    assert out.shape == (N, CLASSES)
    assert got == _forward_by_hand() == 2 * 2 * 3 * 5 * 64 * 9 + 2 * 2 * 320 * 7 + 2 * 2 * 7 * 4


def test_forward_backward_counts_weight_and_input_gradients():
    net = _net()
    x = torch.rand(N, C_IN, H, W)
    fwd, total = flops.count_flops_backward(net, [x])
    assert fwd == _forward_by_hand()
    # backward: every layer computes its weight gradient (same FLOPs as its forward) and the gradient w.r.t. its
    # input (same again; the first conv's too, since x requires grad) → total = 3 × forward
    assert total == 3 * fwd


def test_backward_without_weight_gradients_is_one_forward():
    net = _net().requires_grad_(False)  # frozen weights, gradient w.r.t. the image only (what ACE/DiME take)
    fwd, total = flops.count_flops_backward(net, [torch.rand(N, C_IN, H, W)])
    assert total == 2 * fwd


def test_cpu_attention_is_counted():
    # torch's counter has no entry for the CPU flash-attention kernel; flops.py adds one
    b, heads, seq, dim = 2, 4, 16, 8
    q, k, v = (torch.randn(b, heads, seq, dim) for _ in range(3))
    got, _ = flops.count_flops(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    assert got == 2 * (2 * b * heads * seq * seq * dim)  # QKᵀ and (softmax)·V, each 2·b·h·s·s·d


def test_share_of_peak_and_peak_measurement():
    assert flops.share_of_peak(1e9, 0.5, 4e9) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.share_of_peak(1e9, 0.0, 4e9)
    peak = flops.measure_sgemm_peak(sizes=(128, 256), repeats=3, min_seconds=0.005)
    assert set(peak.by_size) == {128, 256}
    assert peak.flops_per_s == max(peak.by_size.values()) > 1e8  # any machine that runs the tests does 0.1 GFLOP/s
    assert peak.threads == torch.get_num_threads()
    assert flops.share_of_peak(peak.flops_per_s, 1.0, peak) == pytest.approx(1.0)
