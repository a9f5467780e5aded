"""Robust-classifier guidance with cone projection (cfx_cli/guide.py, DVCE)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cfx_cli.classifiers import Classifier, ClassifierOptions
from cfx_cli.errors import UsageError
from cfx_cli.guide import GUIDE_PARAMS, GuidedClassifier, cone_project, guided_classifier
from cfx_cli.plugins import get_explainer_class


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.rad2deg(torch.acos(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)))


def test_cone_projection_keeps_inside_and_projects_outside_onto_the_boundary():
    g = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    r = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r[0] = g[0] + 0.01 * r[0]  # within 30° of g: g itself is kept (DVCE)
    r[1] = -g[1] + 0.3 * r[1]  # almost opposite: still the boundary towards r, never against g
    out = cone_project(g, r, 30.0)
    assert torch.equal(out[0], g[0])
    angles = _angle(out, g)
    assert angles[1:].tolist() == pytest.approx([30.0] * 5, abs=1e-4)
    assert out.flatten(1).norm(dim=1).tolist() == pytest.approx(g.flatten(1).norm(dim=1).tolist(), rel=1e-6)
    # the boundary point lies in the plane of g and r, on r's side: closer to r than g is
    assert (_angle(out[2:], r[2:]) < _angle(g[2:], r[2:])).all()
    assert _angle(cone_project(g, r, 0.0), g).max() < 1e-3  # α = 0: the explained direction
    # the projection rule follows r inside the cone (with ‖g‖), the boundary outside, as the code rule does
    proj = cone_project(g, r, 30.0, "projection")
    assert _angle(proj[:1], r[:1]).item() < 1e-3 and torch.allclose(proj[1:], out[1:])
    assert proj[0].norm() == pytest.approx(float(g[0].norm()), rel=1e-6)
    zero = torch.zeros_like(g)
    assert torch.equal(cone_project(zero, r, 30.0), zero)


class _Linear(Classifier):
    """A white-box toy: logits = W · flattened image."""

    def __init__(self, seed: int, classes: int = 4, gradients: bool = True) -> None:
        self.weight = torch.randn(classes, 3 * 4 * 4, generator=torch.Generator().manual_seed(seed))
        self.labels = [str(i) for i in range(classes)]
        self.capabilities = frozenset({"probabilities", "gradients"} if gradients else {"probabilities"})
        self.spec = f"toy:{seed}"
        self.closed = False

    def logits(self, images):
        self.calls += len(images)
        return images.flatten(1) @ self.weight.T

    def predict_proba(self, images):
        return torch.softmax(self.logits(images), 1)

    def close(self):
        self.closed = True


def test_guided_logits_are_the_explained_ones_and_their_gradient_is_cone_projected():
    explained, guide = _Linear(0), _Linear(1)
    clf = GuidedClassifier(explained, guide, 30.0, "toy:1")
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 0])
    logits = clf.logits(x)
    assert torch.allclose(logits, explained.logits(x))
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    upstream = torch.softmax(logits.detach(), 1) - torch.nn.functional.one_hot(targets, 4)
    g = (upstream @ explained.weight).view_as(x)
    r = (upstream @ guide.weight).view_as(x)
    assert torch.allclose(grad, cone_project(g, r, 30.0), atol=1e-5)
    assert not torch.allclose(grad, g, atol=1e-3)  # the guide changed the direction
    with torch.no_grad():  # no gradient wanted: the guide is not even called
        calls = guide.calls
        clf.logits(x)
        assert guide.calls == calls
    assert clf.labels == explained.labels and clf.spec == "toy:0"
    clf.close()
    assert guide.closed and not explained.closed


def test_a_guide_without_gradients_or_with_other_labels_is_refused_in_one_line(monkeypatch):
    import cfx_cli.guide as guide_mod

    explained = _Linear(0)
    assert guided_classifier(explained, {"guide": ""}, ClassifierOptions(), "toy:0") is explained
    for other, words in ((_Linear(1, gradients=False), "gives no gradients"), (_Linear(1, classes=3), "has 3 labels")):
        monkeypatch.setattr(guide_mod, "load_classifier", lambda spec, options, other=other: other)
        with pytest.raises(UsageError, match=words) as info:
            guided_classifier(explained, {"guide": "toy:1", "guide_cone": 30.0}, ClassifierOptions(), "toy:0")
        assert "\n" not in str(info.value) and "--set guide=toy:1" in str(info.value)
        assert other.closed


@pytest.mark.parametrize("method", ["dime", "fastdime", "ace", "rcsb", "eced", "pgd"])
def test_every_gradient_based_method_declares_the_guide(method):
    names = {p.name for p in get_explainer_class(method).params}
    assert {p.name for p in GUIDE_PARAMS} <= names


def test_explain_with_the_robust_demo_guide_records_it(tmp_path, demo_images, cfx):
    out = tmp_path / "run"
    res = cfx("explain", str(demo_images), "--method", "pgd", "--target", "auto", "--limit", "2", "--out", str(out),
              "--set", "guide=demo:digits-robust", "--set", "guide_cone=45", "--set", "iterations=5")
    assert res.returncode in (0, 1), res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["parameters"]["guide"] == "demo:digits-robust" and math.isclose(run["parameters"]["guide_cone"], 45.0)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] in ("flipped", "not_flipped") for r in records)
    bad = cfx("explain", str(demo_images), "--method", "pgd", "--target", "auto", "--limit", "1", "--out",
              str(tmp_path / "bad"), "--set", "guide=demo:nope")
    assert bad.returncode != 0 and "unknown demo classifier 'demo:nope'" in bad.stderr
