"""The demo protocol's splits and the realism metrics that run offline on the embedded demo: independent judges
(oracle flip rate, MNAC), the demo feature network (FID, sFID, S³), and that they tell an attack from an edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_protocol_splits_are_disjoint_from_training_and_each_other(demo_images):
    from cfx_cli.demo.data import PROTOCOL_SPLITS, load_split, split_indices
    from cfx_cli.images import load_png, to_uint8

    x_tr, _, x_te, y_te = load_split()
    splits = {name: split_indices(name) for name in PROTOCOL_SPLITS}
    assert {k: len(v) for k, v in splits.items()} == {"tuning": 178, "test": 256, "readme": 16}
    for name, idx in splits.items():
        assert len(set(idx)) == len(idx) and all(0 <= i < len(y_te) for i in idx), name
    assert not set(splits["tuning"]) & set(splits["test"])
    assert not (set(splits["tuning"]) | set(splits["test"])) & set(splits["readme"])
    assert len(set().union(*splits.values())) == len(y_te)  # every held-out digit is in exactly one split
    # the README images are the readme split's digits, in file order
    files = sorted(demo_images.glob("*.png"))
    held = to_uint8(x_te.transpose(0, 2, 3, 1))
    assert [int(np.flatnonzero((held == to_uint8(load_png(f))[None]).all(axis=(1, 2, 3)))[0]) for f in files] \
        == splits["readme"]
    # no protocol digit is a pixel copy of a training digit (the demo models train on x_tr only)
    train = {bytes(a) for a in to_uint8(x_tr).reshape(len(x_tr), -1)}
    assert not any(bytes(a) in train for a in to_uint8(x_te).reshape(len(x_te), -1))
    # the tuning and test splits are label-balanced: every label in each, and the first 10 of test are 0–9
    for name in ("tuning", "test"):
        counts = np.bincount(y_te[splits[name]], minlength=10)
        assert counts.min() >= counts.max() - 2, (name, counts)
    assert sorted(y_te[splits["test"][:10]].tolist()) == list(range(10))


@pytest.mark.slow
def test_committed_splits_are_what_the_seeded_script_derives():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_splits.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_judges_are_independent_accurate_and_small():
    import torch

    from cfx_cli.demo import DEMO_DIR
    from cfx_cli.demo.classifier import DigitsCNN, load_pretrained
    from cfx_cli.demo.data import load_protocol_split
    from cfx_cli.demo.judges import ARCHITECTURES, load_judge

    explained = {type(m) for m in load_pretrained().modules()}
    x, y, _ = load_protocol_split("test")
    for name in ARCHITECTURES:
        judge = load_judge(name)
        assert not isinstance(judge, DigitsCNN)
        # not the explained CNN's layer stack: no max pooling; the MLP and the kernel machine have no conv at all
        assert torch.nn.MaxPool2d not in {type(m) for m in judge.modules()}
        assert torch.nn.MaxPool2d in explained
        with torch.no_grad():
            acc = float((judge(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        assert acc >= 0.97, (name, acc)
    meta = json.loads((DEMO_DIR / "judges" / "judges.json").read_text())
    assert set(meta) == set(ARCHITECTURES)
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.suffix in (".safetensors", ".onnx", ".bin"))
    assert total <= 40e6, f"demo weights {total / 1e6:.1f} MB"


def test_oracles_resist_their_own_small_attacks():
    """The oracles were trained against their own ℓ∞ PGD: a perturbation of 0.05 per pixel (below masked PGD's
    32/255) that ascends a judge's own loss leaves ≥ 88 % of the tuning digits readable (the pre-adversarial judges
    kept 82 % and 79 %; the committed ones 97 % and 91 %), and the attack stays in the ball and in [0, 1]."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from train_demo_judges import own_pgd

    from cfx_cli.demo.data import load_protocol_split
    from cfx_cli.demo.judges import load_judge

    x, y, _ = load_protocol_split("tuning")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for name in ("oracle-mlp", "oracle-rff"):
        judge = load_judge(name)
        xa = own_pgd(judge, x, y, 0.05, torch.Generator().manual_seed(0))
        assert float((xa - x).abs().max()) <= 0.05 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        with torch.no_grad():
            robust = float((judge(xa).argmax(1) == y).float().mean())
            clean = float((judge(x).argmax(1) == y).float().mean())
        assert clean >= 0.97 and robust >= 0.88, (name, clean, robust)


def _explain(cfx, demo_images, out, method, limit):
    proc = cfx("explain", str(demo_images), "--method", method, "--target", "auto", "--seed", "0", "--limit",
               str(limit), "--out", str(out), timeout=900)
    assert proc.returncode in (0, 1), proc.stderr


def _eval(cfx, run, metrics, *sets):
    proc = cfx("eval", str(run), "--metrics", metrics, "--format", "json", *sets, env={
        "CFX_INCEPTION_WEIGHTS": "", "CFX_SIMSIAM_WEIGHTS": "", "CFX_ORACLE": "", "CFX_FLIP_ORACLES": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["runs"][0]


@pytest.mark.slow
def test_eval_all_on_a_demo_run_needs_no_download(tmp_path, cfx, demo_images):
    run = tmp_path / "pgd"
    _explain(cfx, demo_images, run, "pgd", 8)
    row = _eval(cfx, run, "all")
    for col in ("fid", "sfid", "s3", "mnac", "oracle_flip_rate", "oracle_flip_rate_mlp", "oracle_flip_rate_rff"):
        assert row[col] is not None, col
    assert not any("weights" in why or "published at" in why for why in row["skipped"].values()), row["skipped"]
    assert row["skipped"]["fva"] == "face verification does not apply to the demo digits (no faces)"
    # the output names the networks that judged
    assert "demo:oracle-mlp (judges/oracle-mlp.safetensors sha256:" in row["oracle_judges"]
    assert "demo:oracle-rff" in row["oracle_judges"] and "demo:oracle-mlp" in row["mnac_oracle"]
    for col in ("fid_network", "sfid_network", "s3_network"):
        assert row[col].startswith("demo:features (judges/features.safetensors sha256:"), col
    # the judges read the originals: they agree with the demo classifier on nearly all of them
    assert row["oracle_source_agreement"] >= 0.9
    # the published-weight paths are still there: asking for Inception on a demo run names its file
    again = _eval(cfx, run, "fid", "--set", "fid_network=inception")
    assert "pt_inception-2015-12-05-6726825d.pth" in again["skipped"]["fid"]
    # an explicit oracle replaces the demo's judges, and says so
    own = _eval(cfx, run, "oracle_flip_rate", "--set", "flip_oracles=demo:digits")
    assert own["oracle_judges"] == "demo:digits" and own["oracle_flip_rate_digits"] == own["oracle_flip_rate"]
    assert own["oracle_flip_rate"] == pytest.approx(row["flip_rate"])  # the explained classifier agrees with itself


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dime", "fastdime", "ace", "rcsb", "time", "eced"])
def test_eval_all_on_every_methods_demo_run_skips_nothing_for_weights(tmp_path, cfx, demo_images, method):
    """Issue 22: `cfx eval RUN --metrics all` on a demo run of every method computes FID, sFID and the oracle
    metrics with the demo's own networks (default presets, the first 4 README digits; 6 for ACE, whose
    digits preset leaves one of those unflipped, while sFID needs two successful counterfactuals in each random
    half)."""
    run = tmp_path / method
    _explain(cfx, demo_images, run, method, {"ace": 6}.get(method, 4))
    row = _eval(cfx, run, "all")
    for col in ("fid", "sfid", "oracle_flip_rate", "oracle_flip_rate_mlp", "oracle_flip_rate_rff", "mnac"):
        assert row[col] is not None, (col, row["skipped"])
    assert not any("weights" in why or "published at" in why for why in row["skipped"].values()), row["skipped"]


def test_oracle_flip_rate_without_oracles_on_a_non_demo_run(tmp_path):
    from cfx_cli.errors import MetricUnavailable
    from cfx_cli.metrics import MetricContext
    from cfx_plugins.metrics.oracle import OracleFlipRate

    class Run:
        info = {"classifier": {"spec": "torchscript:model.pt"}}

    with pytest.raises(MetricUnavailable, match="--set flip_oracles=SPEC"):
        OracleFlipRate().compute(Run(), MetricContext(options={}))


@pytest.mark.slow
def test_oracle_flip_rate_tells_an_attack_from_an_edit(tmp_path, cfx, demo_images):
    """PGD fools the explained CNN; TIME's edits are read as the target digit by the independent judges."""
    rows = {}
    for method in ("pgd", "time"):
        _explain(cfx, demo_images, tmp_path / method, method, 16)
        rows[method] = _eval(cfx, tmp_path / method, "flip_rate,oracle_flip_rate")
    assert rows["pgd"]["flip_rate"] >= 0.9 and rows["time"]["flip_rate"] >= 0.8
    # adversarially trained judges (their own ℓ∞ PGD, never the CNN's): on these 16 digits PGD 16 %, TIME 84 %
    # (72 % with the digits schedule before issue 22)
    assert rows["pgd"]["oracle_flip_rate"] <= 0.25, rows  # issue 22's bound for an attack
    assert rows["time"]["oracle_flip_rate"] >= 0.75, rows  # issue 22's target for a counterfactual method
    assert rows["pgd"]["oracle_flip_rate"] <= rows["time"]["oracle_flip_rate"] - 0.4, rows
    for judge in ("mlp", "rff"):
        assert rows["pgd"][f"oracle_flip_rate_{judge}"] < rows["time"][f"oracle_flip_rate_{judge}"], rows


def test_nearest_target_digit_distance_is_the_minimum_over_that_class():
    bench = _bench()
    train = np.zeros((3, 2, 2, 3))
    train[1] += 0.5
    train[2] += 1.0
    labels = np.array([7, 7, 3])
    orig = np.full((1, 2, 2, 3), 0.4)
    # class 7: |0.4 − 0| = 0.4 and |0.4 − 0.5| = 0.1 → 0.1; class 3 has only the all-ones digit → 0.6
    assert bench.nearest_target_l1(orig, ["7"], train, labels) == pytest.approx([0.1])
    assert bench.nearest_target_l1(orig, ["3"], train, labels) == pytest.approx([0.6])


@pytest.mark.slow
def test_demo_benchmark_runs_a_method_on_protocol_digits(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--split", "tuning", "--n", "4", "--methods", "pgd", "--out", str(tmp_path),
                       "--set", "pgd:iterations=20"]) == 0
    report = json.loads((tmp_path / "tuning" / "benchmark.json").read_text())
    assert report["split"] == "tuning" and report["n"] == 4 and report["settings"] == {"pgd": ["iterations=20"]}
    assert sorted(p.name for p in (tmp_path / "tuning" / "inputs").glob("*.png"))[0].startswith("tuning-")
    row = report["methods"]["pgd"]
    for key in ("flip_rate", "oracle_flip_rate", "l1", "l1_nearest", "l1_ratio", "fid", "fid_train", "fid_target",
                "seconds", "nfe"):
        assert row[key] is not None, key
    assert row["l1_ratio"] == pytest.approx(row["l1"] / row["l1_nearest"])
    assert row["nfe"] == pytest.approx(20)
    # the reference row: the nearest real target digits swapped in, on the same inputs and targets
    ref = report["methods"]["real-nn"]
    assert ref["l1"] == pytest.approx(ref["l1_nearest"]) == pytest.approx(row["l1_nearest"])
    assert ref["oracle_flip_rate"] >= 0.75 and ref["nfe"] == 0
    run = Path(ref["run"])
    recs = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all((run / r["counterfactual"]).is_file() for r in recs)
    out = capsys.readouterr().out
    assert "pgd" in out and "pgd: iterations=20" in out and "real-nn" in out


def test_target_matched_fid_compares_with_the_target_classes_digits():
    """Real digits of the target class score far better against their own class than a source digit does."""
    bench = _bench()
    train_x, train_y = bench.training_digits()
    feats = bench.features(train_x)
    threes, fours = feats[train_y == 3], feats[train_y == 4]
    as_target = bench.target_matched_fid(feats, train_y, threes, ["3"] * len(threes))
    wrong = bench.target_matched_fid(feats, train_y, fours, ["3"] * len(fours))
    assert as_target < 0.2 * wrong
    assert as_target < bench.fid_from_features(feats, threes)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_benchmark", REPO / "bench" / "demo_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
