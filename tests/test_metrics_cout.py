"""COUT: a hand-computed case, a direct step-by-step reimplementation of C3LT's protocol, known answers with
the demo classifier, and a demo pgd run through ``cfx eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfx_plugins.metrics.cout import cout_score


def mean_red(x):
    """K = 2: p(class 1) = mean of the red channel, p(class 0) = 1 − that."""
    p1 = x[:, 0].mean(dim=(1, 2))
    return torch.stack([1 - p1, p1], dim=1)


def test_cout_hand_computed_tiny_case():
    x = torch.zeros(3, 2, 2)
    cf = torch.zeros(3, 2, 2)
    cf[0] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])  # inserted in the order 1.0, 0.5, then the unchanged pixels
    # 4 pixels, 4 steps → step 1; p1 curve 0, .25, .375, .375, .375; p0 = 1 − p1
    # AUPC(p1) = (0/2 + .25 + .375 + .375 + .375/2) / 4 = 0.296875; AUPC(p0) = 0.703125
    assert cout_score(mean_red, x, cf, source=0, target=1, steps=4) == pytest.approx(0.296875 - 0.703125)
    assert cout_score(mean_red, x, x.clone(), source=0, target=1, steps=4) == 0.0  # guard: x_cf == x


def _reference_cout(model, img, cf, label, target, n_steps):
    """C3LT's loop, written out one image at a time: min–max normalized |Δ| map, insertion, trapezoid."""
    mask = (cf - img).abs().sum(0).flatten()
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    n = mask.numel()
    step = max(1, n // n_steps)
    order = torch.argsort(-mask, stable=True)
    cur = torch.zeros(n)
    p = model(img[None])[0]
    c, c_prime = [float(p[label])], [float(p[target])]
    for pixels in range(0, n, step):
        cur[order[pixels : pixels + step]] = 1
        m = cur.view(1, *img.shape[1:])
        p = model((cf * m + img * (1 - m))[None])[0]
        c.append(float(p[label]))
        c_prime.append(float(p[target]))

    def auc(curve):
        return (curve[0] / 2 + sum(curve[1:-1]) + curve[-1] / 2) * step / n

    return auc(c_prime) - auc(c)


def test_cout_matches_direct_reimplementation_on_random_images():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 9 * 7, 4, generator=g)

    def linear_softmax(x):
        return torch.softmax(x.flatten(1) @ w, dim=1)

    for i in range(4):
        x = torch.rand(3, 9, 7, generator=g)
        cf = (x + 0.5 * torch.randn(3, 9, 7, generator=g)).clamp(0, 1)
        for steps in (50, 10):
            ours = cout_score(linear_softmax, x, cf, source=i % 4, target=(i + 1) % 4, steps=steps)
            ref = _reference_cout(linear_softmax, x, cf, i % 4, (i + 1) % 4, steps)
            assert ours == pytest.approx(ref, abs=1e-6)


def test_cout_known_answers_with_demo_classifier(demo_images):
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.images import load_png

    clf = load_classifier("demo:digits", ClassifierOptions())
    x = torch.from_numpy(load_png(demo_images / "digit-00-label0.png")).permute(2, 0, 1).float()
    three = torch.from_numpy(load_png(demo_images / "digit-03-label3.png")).permute(2, 0, 1).float()
    src, tgt = clf.labels.index("0"), clf.labels.index("3")
    with torch.no_grad():
        score = cout_score(clf.predict_proba, x, three, src, tgt)
        reverse = cout_score(clf.predict_proba, x, three, tgt, src)
    assert score > 0.2  # a real image of the target class as counterfactual: the curve crosses over
    assert reverse == pytest.approx(-score)  # two-class view: swapping roles flips the sign
    assert cout_score(clf.predict_proba, x, x.clone(), src, tgt) == 0.0


@pytest.mark.slow
def test_cout_on_demo_pgd_run(tmp_path, cfx, demo_images):
    run = tmp_path / "run"
    assert cfx("explain", str(demo_images), "--method", "pgd", "--out", str(run), "--limit", "6").returncode == 0
    proc = cfx("eval", str(run), "--metrics", "cout,flip_rate", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["skipped"] == {}
    assert -1 <= row["cout"] <= 1 and row["cout_unchanged"] == 0
    # recompute from the files with the reference loop
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.images import load_png

    clf = load_classifier("demo:digits", ClassifierOptions())
    recs = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]
    vals = []
    with torch.no_grad():
        for r in recs:
            if r["status"] not in ("flipped", "not_flipped"):
                continue
            x, cf = (
                torch.from_numpy(load_png(run / r[k])).permute(2, 0, 1).float() for k in ("original", "counterfactual")
            )
            vals.append(
                _reference_cout(
                    clf.predict_proba,
                    x,
                    cf,
                    clf.labels.index(r["source_label"]),
                    clf.labels.index(r["target_label"]),
                    50,
                )
            )
    assert row["cout"] == pytest.approx(float(np.mean(vals)), abs=1e-5)
    assert row["cout"] > 0  # pgd flips these inputs: the target overtakes the source along the insertion


def test_cout_and_features_accept_grey_images(tmp_path, demo_images):
    """Folders written by other tools may hold greyscale PNGs: metrics see them as three equal channels."""
    from PIL import Image

    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.metrics import MetricContext
    from cfx_cli.runs import RunData
    from cfx_plugins.metrics.cout import COUT
    from cfx_plugins.nets.features import cached_features

    for name, src in (("o.png", "digit-00-label0.png"), ("c.png", "digit-03-label3.png")):
        Image.open(demo_images / src).convert("L").save(tmp_path / name)
    rec = {
        "id": "a",
        "status": "flipped",
        "original": "o.png",
        "counterfactual": "c.png",
        "source_label": "0",
        "target_label": "3",
    }
    run = RunData(tmp_path, {}, [rec])
    clf = load_classifier("demo:digits", ClassifierOptions())
    value = COUT().compute(run, MetricContext(_classifier_loader=lambda: clf))["cout"]
    assert value > 0.2
    feats = cached_features(run, ["o.png", "c.png"], "mean-rgb", lambda x: x.mean(dim=(2, 3)))
    assert feats.shape == (2, 3) and np.allclose(feats[:, 0], feats[:, 2])
    assert (tmp_path / ".cache" / "mean-rgb.npz").exists()
