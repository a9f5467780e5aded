"""bench/gpu_suite.py cannot rot: its --tiny mode (the demo models on the CPU) runs every method through the
pipeline, a precision variant and a bigger batch, and writes one JSON row per method × variant (with its difference
from the fp32 run's counterfactuals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

METHODS = {"dime", "ace", "rcsb", "time", "eced", "pgd"}


@pytest.mark.slow
def test_tiny_suite_runs_every_method(tmp_path):
    out = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--tiny", "--variants",
                          "fp32,fp16_b2", "--work", str(tmp_path / "work"), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    rows = {(r["method"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(m, v) for m in METHODS for v in ("fp32", "fp16_b2")}
    for m in METHODS:
        ref = rows[m, "fp32"]
        assert ref["status"] == "ok", ref
        assert ref["seconds"] > 0 and ref["flops"] > 0 and 0 < ref["share_of_peak"] < 1.5
    for m in METHODS:  # every method honours --precision: the batched fp16 run explained one batch of 2
        row = rows[m, "fp16_b2"]
        assert row["status"] == "ok" and row["images"] == 2, row
        assert 0 <= row["mean_abs_diff_vs_fp32"] <= row["max_abs_diff_vs_fp32"] <= 1
    for m in ("rcsb", "eced", "pgd"):  # no forward-only calls: their gradients ran under autocast (or the gate said no)
        assert rows[m, "fp16_b2"]["ran"]["gradients"].startswith(("autocast fp16 (gate: output ", "fp32"))
    assert rows["time", "fp16_b2"]["ran"]["backend"].startswith("torch (fp16")
    assert "| dime | fp32 |" in res.stdout and data["matmul_peak_flops"] > 0


def test_resnet50_classifier_has_the_published_shape():
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from gpu_suite import resnet50_classifier

    net = resnet50_classifier()
    assert sum(p.numel() for p in net.parameters()) == 23_512_130  # ResNet-50's 25.6 M minus its 1000-class head
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, 2)


def test_memory_per_image_is_the_peak_growth_per_added_image():
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_suite import memory_per_image

    rows = [{"method": "ace", "batch": 1, "status": "ok", "precision": "fp32", "peak_memory_gib": 10.0},
            {"method": "ace", "batch": 4, "status": "ok", "precision": "fp32", "peak_memory_gib": 13.0},
            {"method": "ace", "batch": 4, "status": "ok", "precision": "fp16", "peak_memory_gib": 11.0},
            {"method": "rcsb", "batch": 1, "status": "ok", "precision": "fp32", "peak_memory_gib": 1.0}]
    assert memory_per_image(rows, 4) == {"ace": 1.0}  # rcsb has no batch-4 row: no estimate


@pytest.mark.slow
def test_grad_precision_bench_reports_the_difference_from_fp32(tmp_path):
    """bench/grad_precision.py (the demo-scale companion of the suite's |Δ| columns) runs and says what ran."""
    out = tmp_path / "grad.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "bench" / "grad_precision.py"), "--methods", "pgd,rcsb",
                          "--variants", "fp32,bf16,channels_last", "--limit", "2", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {(r["method"], r["variant"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows["pgd", "channels_last"]["status"] == "n/a"
    for m in ("pgd", "rcsb"):
        half = rows[m, "bf16"]
        assert half["ran"]["gradients"].startswith("autocast bf16 (gate: output ") and half["same_label"] == 2
        assert 0 < half["mean_abs_diff"] < 0.01
    assert rows["rcsb", "channels_last"]["max_abs_diff"] <= 1 / 255 + 1e-4
    assert "| rcsb | bf16 | 2/2 |" in res.stdout
    spread = subprocess.run([sys.executable, str(REPO / "bench" / "grad_precision.py"), "--gate-spread"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert spread.returncode == 0, spread.stderr
    rows = [line.split("|")[1:-1] for line in spread.stdout.splitlines()[2:]]
    assert len(rows) == 18  # 2 precisions × 3 batches × 3 seeds
    for _, _, _, elementwise, norm in rows:  # the norm-wise error is the smaller: what the gate's choice rests on
        assert 0 < float(norm) <= float(elementwise)


def test_best_batch_fits_memory_and_time_and_is_above_the_measured_batch():
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_suite import best_batch

    rows = [{"method": "ace", "variant": "fp32", "status": "ok", "peak_memory_gib": 10.0, "seconds": 4.0},
            {"method": "ace", "variant": "fp32_b4", "status": "ok", "peak_memory_gib": 16.0, "seconds": 3.0},
            {"method": "ace", "variant": "fp16_b4", "status": "ok", "seconds": 1.0}]
    # memory: 10 + (B − 1)·2 ≤ 0.9·40 → B ≤ 14; time: 100 s at 1 s per explanation → 100; cap 16
    assert best_batch(rows, "ace", 4, memory_gib=40, seconds_left=100) == 14
    assert best_batch(rows, "ace", 4, memory_gib=139, seconds_left=100) == 16  # the cap (images per variant)
    assert best_batch(rows, "ace", 4, memory_gib=139, seconds_left=9) == 9  # the time left
    assert best_batch(rows, "ace", 4, memory_gib=139, seconds_left=3) is None  # not above the measured batch
    assert best_batch(rows[:2], "ace", 4, memory_gib=139, seconds_left=100) is None  # no fp16 row to time by


def test_compile_rows_follow_what_each_method_declares():
    """Which methods take --compile, and whose compile (a backward graph) runs last, come from the explainer classes."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_suite import compiles, method_order, tiny_methods, variants

    by_name = {m.name: m for m in tiny_methods()}
    assert not compiles(by_name["pgd"]) and all(compiles(by_name[m]) for m in ("dime", "ace", "rcsb", "time", "eced"))
    chosen = variants(2, cuda=True)
    assert chosen[1].name == "fp16_graphs"
    assert [v.name for v in method_order(by_name["time"], chosen)] == [v.name for v in chosen]
    for m in ("ace", "rcsb", "eced"):
        assert [v.name for v in method_order(by_name[m], chosen)][-1] == "fp16_graphs"
