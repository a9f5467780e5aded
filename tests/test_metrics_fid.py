"""FID/sFID: the Fréchet distance against scipy and closed forms, the split protocol, the FID Inception
loading a file in the published key layout, the feature cache and the missing-weights message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metric_weights import inception_file

from cfx_plugins.metrics.fid import (
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    sfid_from_features,
)


def _scipy_fid(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 1.0
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert np.allclose(s1, np.cov(a.T)) and np.allclose(mu1, a.mean(0))


def test_frechet_distance_closed_forms():
    # identical Gaussians: 0; diagonal covariances: Σ (σ1 − σ2)² + ‖Δμ‖²
    s = np.diag([1.0, 4.0, 9.0])
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0, abs=1e-9)
    s2 = np.diag([4.0, 1.0, 0.25])
    mu2 = np.array([1.0, -2.0, 0.0])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(np.zeros(3), s, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions (singular covariances): the low-rank path equals the scipy reference
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 50)), rng.normal(size=(7, 50)) + 0.3
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(_scipy_fid(*gaussian_stats(a), *gaussian_stats(b)), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(*gaussian_stats(a), *gaussian_stats(b)), rel=1e-6)
    # and with more samples than dimensions both paths agree as well
    a, b = rng.normal(size=(80, 6)), rng.normal(size=(90, 6)) * 2
    assert fid_from_features(a, b) == pytest.approx(
        _scipy_fid(*gaussian_stats(a), *gaussian_stats(b)), rel=1e-6
    )


def test_sfid_split_protocol():
    rng = np.random.default_rng(0)
    n = 40
    real = rng.normal(size=(n, 6))
    fake = real + 0.1 * rng.normal(size=(n, 6))
    flipped = np.ones(n, bool)
    vals = sfid_from_features(real, fake, flipped, splits=7, seed=3)
    assert len(vals) == 7 and len(set(vals)) > 1  # a new random split each time
    assert vals == sfid_from_features(real, fake, flipped, splits=7, seed=3)  # reproducible
    # the first split by hand: halves from the same permutation, FIDs of disjoint halves averaged
    perm = np.random.default_rng(3).permutation(n)
    a, b = perm[:20], perm[20:]
    expected = 0.5 * (fid_from_features(real[a], fake[b]) + fid_from_features(real[b], fake[a]))
    assert vals[0] == pytest.approx(expected, rel=1e-12)
    # failed counterfactuals are left out, whatever their features
    flipped[::4] = False
    fake_bad = fake.copy()
    fake_bad[~flipped] = 1e6
    vals_bad = sfid_from_features(real, fake_bad, flipped, splits=3, seed=0)
    assert max(vals_bad) < 100
    with pytest.raises(ValueError, match="at least two"):
        sfid_from_features(real[:3], fake[:3], np.ones(3, bool), splits=1)


@pytest.mark.slow
def test_fid_inception_loads_published_layout_and_gives_pool3(tmp_path):
    import torch

    from cfx_plugins.nets.inception import load

    path = inception_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    state = torch.load(path, weights_only=True)
    # a few keys and shapes of the published pytorch-fid file
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
    }.items():
        assert tuple(state[key].shape) == shape
    assert not any(k.startswith("AuxLogits") for k in state)
    net = load(path)
    with torch.no_grad():
        feats = net(torch.rand(2, 3, 16, 16))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.abs().mean() > 1e-3
    # a file with other keys is refused with the file named
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    from cfx_cli.errors import MetricUnavailable

    with pytest.raises(MetricUnavailable, match="other.pth: not the expected weights"):
        load(tmp_path / "other.pth")


@pytest.mark.slow
def test_missing_inception_weights_name_the_file(tmp_path, cfx, demo_images):
    run = tmp_path / "run"
    assert (
        cfx("explain", str(demo_images), "--method", "pgd", "--out", str(run), "--limit", "4").returncode == 0
    )
    # a demo run is judged by the demo's feature network unless Inception is asked for
    proc = cfx("eval", str(run), "--metrics", "fid,sfid", "--format", "json", "--set", "fid_network=inception",
               env={"CFX_INCEPTION_WEIGHTS": ""})
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads(proc.stdout)["runs"][0]["skipped"]
    assert "pt_inception-2015-12-05-6726825d.pth" in skipped["fid"]
    assert "github.com/mseitzer/pytorch-fid/releases" in skipped["fid"]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("skipped fid")]
    assert len(lines) == 1 and "--set inception_weights=PATH" in lines[0]
    proc = cfx("eval", str(run), "--metrics", "fid", "--set", f"inception_weights={tmp_path / 'nope.pth'}")
    assert f"{tmp_path / 'nope.pth'}: no such file" in proc.stderr


@pytest.mark.slow
def test_fid_on_demo_run_matches_direct_computation_and_caches(tmp_path, cfx, demo_images):
    import torch

    from cfx_cli.images import load_png
    from cfx_plugins.nets.inception import load

    weights = inception_file(tmp_path / "inception.pth")
    run = tmp_path / "run"
    # 4 inputs (8 Inception passes at 299×299): enough for FID and for sFID's halves of two
    assert (
        cfx("explain", str(demo_images), "--method", "pgd", "--out", str(run), "--limit", "4").returncode == 0
    )
    args = (
        "eval",
        str(run),
        "--metrics",
        "fid,sfid",
        "--format",
        "json",
        "--set",
        f"inception_weights={weights}",
        "--set",
        "sfid_splits=4",
    )
    proc = cfx(*args)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["skipped"] == {}
    assert list((run / ".cache").glob("fid-inception-*.npz"))
    recs = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    net = load(weights)

    def feats(key, only_flipped=False):
        imgs = [load_png(run / r[key]) for r in recs if r["status"] == "flipped" or not only_flipped]
        with torch.no_grad():
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
            return net(x).double().numpy()

    expected = fid_from_features(feats("original"), feats("counterfactual", True))
    assert row["fid"] == pytest.approx(expected, rel=1e-3)
    assert row["fid_n"] == sum(r["status"] == "flipped" for r in recs)
    assert row["sfid_splits"] == 4 and row["sfid"] > 0 and row["sfid_std"] >= 0
    again = json.loads(cfx(*args).stdout)["runs"][0]  # served from the cache
    assert again["fid"] == pytest.approx(row["fid"], rel=1e-9) and again["sfid"] == pytest.approx(row["sfid"])


def test_fid_equals_torchmetrics_on_the_same_images_and_weights(tmp_path, cfx, demo_images):
    """Independent check of the whole FID computation: torchmetrics' FrechetInceptionDistance, given cfx's
    Inception (random weights in the published layout) as its feature extractor, on the run's images."""
    import torch

    torchmetrics_fid = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics is in the dev extra")
    from cfx_cli.images import load_png
    from cfx_plugins.nets.inception import load

    weights = inception_file(tmp_path / "inception.pth")
    run = tmp_path / "run"
    assert cfx("explain", str(demo_images), "--method", "pgd", "--out", str(run), "--limit", "6").returncode == 0
    proc = cfx("eval", str(run), "--metrics", "fid", "--format", "json", "--set", f"inception_weights={weights}")
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)["runs"][0]["fid"]

    net = load(weights).eval()

    class Features(torch.nn.Module):
        num_features = 2048

        def forward(self, x):
            return net(x.float())

    tm = torchmetrics_fid.FrechetInceptionDistance(feature=Features(), normalize=True)
    recs = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]

    def batch(key, only_flipped=False):
        imgs = [load_png(run / r[key]) for r in recs if r["status"] == "flipped" or not only_flipped]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()

    with torch.no_grad():
        tm.update(batch("original"), real=True)
        tm.update(batch("counterfactual", only_flipped=True), real=False)
        theirs = float(tm.compute())
    assert ours == pytest.approx(theirs, rel=1e-3)
