"""MNAC and CD: synthetic attributes with known answers, the correlations file formats, and the demo
classifier standing in as the attribute oracle on a demo run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfx_plugins.metrics.oracle import correlation_difference, mnac, read_correlations


def test_mnac_counts_changed_attributes():
    orig = np.array([[1, 0, 0], [1, 1, 0]], bool)
    cf = np.array([[0, 1, 0], [1, 1, 0]], bool)
    assert list(mnac(orig, cf)) == [2, 0]


def test_cd_on_synthetic_attributes_with_known_correlation():
    # attributes q (query), a (always moves with q), b (independent of q in the data)
    data_corr = np.array([1.0, 1.0, 0.0])
    orig = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
    # counterfactuals flip q; a follows q; b changes in a pattern uncorrelated with Δq
    cf = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 1]], bool)
    cd, ours = correlation_difference(orig, cf, 0, data_corr)
    assert ours == pytest.approx([1.0, 1.0, 0.0]) and cd == pytest.approx(0.0)
    # now b flips together with q although it is independent of q in the data: CD = |1 − 0| = 1
    cf2 = cf.copy()
    cf2[:, 2] = ~orig[:, 0]
    orig2 = orig.copy()
    orig2[:, 2] = orig[:, 0]
    cd2, ours2 = correlation_difference(orig2, cf2, 0, data_corr)
    assert ours2[2] == pytest.approx(1.0) and cd2 == pytest.approx(1.0)
    # an attribute that never changes has an undefined correlation, counted as 0 (as ACE does)
    cd3, ours3 = correlation_difference(orig, np.c_[cf[:, :2], orig[:, 2]], 0, np.array([1.0, 1.0, 0.5]))
    assert ours3[2] == 0 and cd3 == pytest.approx(0.5)


def test_read_correlations_json_and_annotation_csv(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"Smiling": 1.0, "Mouth_Slightly_Open": 0.53}))
    assert list(read_correlations(tmp_path / "c.json", ["Smiling", "Mouth_Slightly_Open"], "Smiling")) == [
        1.0,
        0.53,
    ]
    # CelebA style: an image id column, then ±1 per attribute
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2, 200)
    a = np.where(rng.random(200) < 0.8, q, 1 - q)
    rows = ["image_id,Smiling,Open"] + [
        f"{i:06d}.jpg,{2 * x - 1},{2 * y - 1}" for i, (x, y) in enumerate(zip(q, a, strict=True))
    ]
    (tmp_path / "attrs.csv").write_text("\n".join(rows) + "\n")
    corr = read_correlations(tmp_path / "attrs.csv", ["Smiling", "Open"], "Smiling")
    assert corr[0] == pytest.approx(1.0) and corr[1] == pytest.approx(np.corrcoef(q, a)[0, 1])
    from cfx_cli.errors import MetricUnavailable

    with pytest.raises(MetricUnavailable, match="attrs.csv: no column for Beard"):
        read_correlations(tmp_path / "attrs.csv", ["Smiling", "Beard"], "Smiling")


@pytest.mark.slow
def test_mnac_and_cd_on_demo_run_with_demo_oracle(tmp_path, cfx, demo_images):
    from cfx_cli.demo.data import load_split

    run = tmp_path / "run"
    proc = cfx(
        "explain", str(demo_images), "--method", "pgd", "--target", "3", "--out", str(run), "--limit", "8"
    )
    assert proc.returncode == 0, proc.stderr
    # the data's correlations between the digit "attributes" (one-hot labels of the demo training split)
    y = load_split()[1]
    header = ",".join(str(k) for k in range(10))
    rows = [header] + [",".join("1" if k == int(v) else "0" for k in range(10)) for v in y]
    (tmp_path / "digits.csv").write_text("\n".join(rows) + "\n")
    oracle = ("--format", "json", "--set", "oracle=demo:digits", "--set", "oracle_query=3")
    proc = cfx("eval", str(run), "--metrics", "mnac,cd", *oracle, "--set", f"correlations={tmp_path / 'digits.csv'}")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["skipped"] == {}
    # the oracle is the explained classifier: a flip turns the source digit off and "3" on
    assert 1.0 <= row["mnac"] <= 2.0
    assert 0 <= row["cd"] <= 20
    proc = cfx("eval", str(run), "--metrics", "cd", *oracle)
    assert "correlations" in json.loads(proc.stdout)["runs"][0]["skipped"]["cd"]
