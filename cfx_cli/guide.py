"""Robust-classifier guidance with cone projection (DVCE: Augustin et al., "Diffusion Visual Counterfactual
Explanations", NeurIPS 2022, sec. 3.3), shared by every gradient-based explainer.

A non-robust classifier's input gradient is mostly adversarial: following it changes the classifier's output
with pixel patterns nobody else reads as the target. DVCE guides with the gradient of an adversarially robust
classifier (perceptually aligned), projected onto the cone of half-angle α around the explained classifier's
gradient, so that every step still raises the explained classifier's score (for α < 90°) and the explanation stays
one of the explained classifier, which also still decides every flip.

``--set guide=SPEC`` (any white-box classifier spec with the same labels, e.g. ``demo:digits-robust``) and
``--set guide_cone=DEG`` are declared by each gradient-based explainer (``GUIDE_PARAMS``); the pipeline
(``explain/batch.py``) then hands the explainer a :class:`GuidedClassifier` instead of the plain classifier.
Its ``logits`` are the explained classifier's; only their gradient with respect to the image changes: per image,
with g the explained classifier's gradient and r the guide's (both for the same upstream gradient, i.e. the
explainer's own loss applied to the guide's logits, linearised at the explained classifier's logits):

    ∠(r, g) ≤ α:  g                     (``guide_rule=code``, the default: DVCE's released code,
                                         ``cone_projection(grad_robust, grad_explained, deg)`` in
                                         blended_diffusion/optimization/dff_attack.py, keeps the explained
                                         direction inside the cone)
                  ‖g‖ r̂                 (``guide_rule=projection``: the Euclidean projection of r onto the cone,
                                         which is r itself inside it; a cfx option)
    otherwise:    ‖g‖ (cos α ĝ + sin α v̂),  v = r − (r·ĝ) ĝ   (the cone's boundary towards r, both rules)

So under the code's rule α is how far the direction may turn towards r, and r is followed only where it points
more than α away from g; under the projection rule r is followed wherever it lies within α of g. DVCE's code
returns the unit directions and normalises them before its own guidance scale; cfx keeps ‖g‖ so that each
method's own step sizes and scales mean what they meant without a guide.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from cfx_cli.backends.grad import backward_may_rerun
from cfx_cli.classifiers import Classifier, ClassifierOptions, WrappedClassifier, load_classifier
from cfx_cli.errors import UsageError
from cfx_cli.params import Param

if TYPE_CHECKING:
    import torch

#: the parameters every gradient-based explainer declares (``params = (..., *GUIDE_PARAMS)``); the names ``guide``
#: and ``guide_cone`` are reserved for this meaning
GUIDE_PARAMS: tuple[Param, ...] = (
    Param("guide", "str", "", "robust-classifier guidance (DVCE): a white-box classifier spec with the explained "
          "classifier's labels whose gradient, cone-projected, replaces the explained classifier's (e.g. "
          "demo:digits-robust); '' = the explained classifier's own gradient. Flips are still decided by the "
          "explained classifier"),
    Param("guide_cone", "float", 30.0, "cone half-angle α in degrees around the explained classifier's gradient "
          "that the guide's gradient is projected into (DVCE's 30°; 0 = the explained gradient)", min=0.0, max=90.0),
    Param("guide_rule", "str", "code", "inside the cone: code = the explained gradient (DVCE's released code), "
          "projection = the guide's own direction (the Euclidean projection onto the cone); outside it both take "
          "the cone's boundary towards the guide", choices=("code", "projection")),
)


def cone_project(explained: torch.Tensor, guide: torch.Tensor, degrees: float, rule: str = "code") -> torch.Tensor:
    """Per image (dim 0), with the norm of ``explained``: where the angle to ``guide`` is at most ``degrees``,
    ``explained`` (rule ``code``) or the direction of ``guide`` (rule ``projection``); elsewhere the unit vector on
    the cone's boundary towards ``guide``. Images with a zero gradient keep it."""
    import math

    import torch

    g = explained.flatten(1).double()
    r = guide.flatten(1).to(g)
    g_norm = g.norm(dim=1, keepdim=True)
    g_hat = g / g_norm.clamp_min(1e-30)
    along = (r * g_hat).sum(dim=1, keepdim=True)
    v = r - along * g_hat
    v_hat = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    rad = math.radians(degrees)
    cos_angle = along / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    inside = (cos_angle >= math.cos(rad)) | (g_norm == 0) | (v.norm(dim=1, keepdim=True) == 0)
    boundary = g_norm * (math.cos(rad) * g_hat + math.sin(rad) * v_hat)
    within = g if rule == "code" else g_norm * r / r.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out = torch.where(inside, within, boundary)
    return out.to(explained.dtype).view_as(explained)


@functools.cache
def _cone_function():
    """The autograd function (built on first use: this module is imported by ``cfx --help``, torch is not)."""
    import torch

    class ConeGuided(torch.autograd.Function):
        @staticmethod
        def forward(ctx, images, explained, guide, degrees, rule):
            with torch.enable_grad():
                x = images.detach().requires_grad_(True)
                ctx.graph = (x, explained.logits(x), guide.logits(x))
            ctx.degrees, ctx.rule = degrees, rule
            return ctx.graph[1].detach()

        @staticmethod
        def backward(ctx, grad_logits):
            x, own, other = ctx.graph
            rerun = backward_may_rerun()  # a loss-scaled fp16 backward may run this again: keep the inner graphs
            if not rerun:
                del ctx.graph  # otherwise one backward pass per forward: free them now
            (g,) = torch.autograd.grad(own, x, grad_logits.to(own.dtype), retain_graph=rerun)
            (r,) = torch.autograd.grad(other, x, grad_logits.to(other.dtype), retain_graph=rerun)
            return cone_project(g, r, ctx.degrees, ctx.rule), None, None, None, None

    return ConeGuided


class GuidedClassifier(WrappedClassifier):
    """The explained classifier (``inner``) with cone-projected robust guidance in its logits' gradient (module
    docstring). Everything but ``logits``' gradient is the explained classifier's (its probabilities, labels,
    layers); the guide's forward passes are not counted in ``calls`` (one per gradient)."""

    def __init__(self, explained: Classifier, guide: Classifier, degrees: float, guide_spec: str,
                 rule: str = "code") -> None:
        self.inner, self.guide, self.degrees, self.guide_spec = explained, guide, float(degrees), guide_spec
        self.rule = rule
        self.labels, self.capabilities, self.spec = explained.labels, explained.capabilities, explained.spec

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this wrapper lacks (the explained classifier's module, layers, …)
        return getattr(self.__dict__["inner"], name)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        if not (torch.is_grad_enabled() and images.requires_grad):
            return self.inner.logits(images)
        return _cone_function().apply(images, self.inner, self.guide, self.degrees, self.rule)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.predict_proba(images)

    def label_index(self, label: str) -> int:
        return self.inner.label_index(label)

    def describe(self) -> dict:
        return {**self.inner.describe(), "guide": self.guide_spec, "guide_cone": self.degrees,
                "guide_rule": self.rule}

    def close(self) -> None:
        self.guide.close()  # the explained classifier is closed by whoever loaded it


def guided_classifier(classifier: Classifier, params: dict[str, Any], options: ClassifierOptions,
                      spec: str) -> Classifier:
    """The classifier an explainer should see: ``classifier`` itself, or wrapped in its guide when the method's
    parameters name one (``guide``). Refuses, in one line, a guide without gradients or with other labels."""
    guide_spec = str(params.get("guide") or "")
    if not guide_spec:
        return classifier
    guide = load_classifier(guide_spec, options)
    problem = None
    if "gradients" not in guide.capabilities:
        problem = "gives no gradients (it must be a white-box classifier)"
    elif "gradients" not in classifier.capabilities:
        problem = f"cannot guide {spec}, which gives no gradients"
    elif len(guide.labels) != len(classifier.labels):
        problem = f"has {len(guide.labels)} labels, the explained classifier {spec} has {len(classifier.labels)}"
    if problem:
        guide.close()
        raise UsageError(f"--set guide={guide_spec}: the guide {problem}")
    return GuidedClassifier(classifier, guide, params.get("guide_cone", 30.0), guide_spec,
                            params.get("guide_rule", "code"))
