"""Sharded runs (`--shard i/n`) merged with `cfx merge` equal the unsharded run."""

from __future__ import annotations

import json

import pytest
from conftest import run_cfx


def _by_id(run):
    return {r["id"]: r for r in map(json.loads, (run / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_three_shards_merged_equal_the_whole_run(tmp_path, demo_images):
    common = ["--method", "pgd", "--set", "iterations=10", "--seed", "3"]
    whole = tmp_path / "whole"
    assert run_cfx("explain", str(demo_images), *common, "--out", str(whole)).returncode == 0
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        proc = run_cfx("explain", str(demo_images), *common, "--shard", f"{i}/3", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        shards.append(str(out))
    sizes = [len(_by_id(tmp_path / f"shard{i}")) for i in range(3)]
    assert sizes == [6, 5, 5]
    merged = tmp_path / "merged"
    proc = run_cfx("merge", *shards, "--out", str(merged))
    assert proc.returncode == 0, proc.stderr
    a, b = _by_id(whole), _by_id(merged)
    assert a.keys() == b.keys() and len(b) == 16
    for ident in a:
        for key in ("status", "source_label", "target_label", "cf_label", "seed", "nfe"):
            assert a[ident][key] == b[ident][key], (ident, key)
        # the same image's probability, computed in a batch of another composition, may differ in the last
        # float bits (the kernels block batches differently); the record rounds to 6 decimals
        for key in ("source_prob", "target_prob_before", "target_prob_after"):
            assert a[ident][key] == pytest.approx(b[ident][key], abs=1e-5), (ident, key)
        for field in ("original", "counterfactual"):
            assert (whole / a[ident][field]).read_bytes() == (merged / b[ident][field]).read_bytes()
    row = json.loads(run_cfx("eval", str(merged), "--format", "json").stdout)["runs"][0]
    assert row["n"] == 16


def test_bad_shard_and_mismatched_merge(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--shard", "3/3")
    assert proc.returncode == 2 and "0 <= i < n" in proc.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "1", "--out", str(a),
                   "--set", "iterations=2").returncode == 0
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "1", "--out", str(b),
                   "--set", "iterations=3").returncode == 0
    proc = run_cfx("merge", str(a), str(b), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and "different" in proc.stderr


def test_merge_carries_seeds_subruns(tmp_path, demo_images):
    """Shards of a `--seeds 2` job: the merged run has seeds/1 with every input, as the shards' sub-runs had it."""
    common = ["--method", "pgd", "--set", "iterations=2", "--limit", "4", "--seeds", "2"]
    shards = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        proc = run_cfx("explain", str(demo_images), *common, "--shard", f"{i}/2", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        shards.append(out)
    merged = tmp_path / "merged"
    proc = run_cfx("merge", *map(str, shards), "--out", str(merged))
    assert proc.returncode == 0, proc.stderr
    sub = _by_id(merged / "seeds" / "1")
    expected = {**_by_id(shards[0] / "seeds" / "1"), **_by_id(shards[1] / "seeds" / "1")}
    assert sub.keys() == expected.keys() and len(sub) == 4
    for ident, rec in sub.items():
        assert rec["seed"] == expected[ident]["seed"] != _by_id(merged)[ident]["seed"]  # the sub-run's own seed
        assert (merged / "seeds" / "1" / rec["original"]).read_bytes() == \
            (tmp_path / ("shard0" if ident in _by_id(shards[0] / "seeds" / "1") else "shard1") / "seeds" / "1"
             / expected[ident]["original"]).read_bytes()
    assert json.loads((merged / "seeds" / "1" / "run.json").read_text())["seed"] == 1
    # a shard without the seeds/ sub-runs cannot be merged with ones that have them, and nothing is written
    plain = tmp_path / "plain"
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "iterations=2", "--limit", "4",
                   "--shard", "1/2", "--out", str(plain)).returncode == 0
    proc = run_cfx("merge", str(shards[0]), str(plain), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "seeds/" in proc.stderr and not (tmp_path / "bad").exists()
