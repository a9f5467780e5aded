"""COUT, the counterfactual transition score of C3LT (Khorram & Fuxin 2022) as ACE evaluates it.

Pixels of the counterfactual are inserted into the original in descending order of Σ_channels |x_cf − x|,
``step = max(1, H·W // steps)`` pixels at a time (steps = 50), and the explained classifier scores every
intermediate image. With p_s, p_t the source- and target-class probabilities along the way (the original
first), AUPC(p) = (p_0/2 + p_1 + … + p_{m−1} + p_m/2) · step / (H·W) (trapezoid rule) and
COUT = AUPC(p_t) − AUPC(p_s) ∈ [−1, 1]. Over every explained input, successful or not.

Guard: where x_cf == x the reference divides 0 by 0 (its min–max normalization); cfx scores such an input 0
— no transition happened — and counts it in ``cout_unchanged``.
"""

from __future__ import annotations

import numpy as np

from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_plugins.nets.weights import int_option


def insertion_order(x, cf):
    """Flat pixel indices by descending Σ_c |cf − x| (stable for ties, so the result is deterministic)."""
    import torch

    score = (cf - x).abs().sum(dim=0).flatten()
    return torch.argsort(-score, stable=True)


def cout_curves(predict, x, cf, source: int, target: int, steps: int = 50, batch_size: int = 64):
    """Probability curves (p_source, p_target) and the step size for one image pair (3, H, W) in [0, 1].
    ``predict`` maps (B, 3, H, W) → (B, K) probabilities."""
    import torch

    _, h, w = x.shape
    n = h * w
    step = max(1, n // steps)
    order = insertion_order(x, cf)
    starts = list(range(0, n, step))
    masks = torch.zeros(len(starts) + 1, n, dtype=x.dtype)
    for j, s in enumerate(starts, 1):
        masks[j] = masks[j - 1]
        masks[j, order[s:s + step]] = 1
    masks = masks.view(-1, 1, h, w)
    ps, pt = [], []
    for i in range(0, len(masks), batch_size):
        m = masks[i:i + batch_size]
        probs = predict(cf[None] * m + x[None] * (1 - m))
        ps.append(probs[:, source].double().cpu())
        pt.append(probs[:, target].double().cpu())
    return torch.cat(ps).numpy(), torch.cat(pt).numpy(), step


def aupc(curve: np.ndarray, step: int, n_pixels: int) -> float:
    return float((curve[0] / 2 + curve[1:-1].sum() + curve[-1] / 2) * step / n_pixels)


def cout_score(predict, x, cf, source: int, target: int, steps: int = 50) -> float:
    if bool((x == cf).all()):
        return 0.0
    ps, pt, step = cout_curves(predict, x, cf, source, target, steps)
    n = x.shape[1] * x.shape[2]
    return aupc(pt, step, n) - aupc(ps, step, n)


def _class_index(labels: list[str], name) -> int:
    if name in labels:
        return labels.index(name)
    if name is not None and str(name).isdigit() and int(name) < len(labels):
        return int(name)  # folders in the ACE layout record class indices
    raise ValueError(name)


class COUT(Metric):
    name = "cout"
    summary = "COUT (C3LT): AUPC(target) − AUPC(source) while inserting counterfactual pixels, 50 steps"
    needs = frozenset({"classifier"})
    default = False
    lower_is_better = False
    unranked = frozenset({"cout_unchanged"})  # how many counterfactuals equal their original

    def compute(self, run, context):
        import torch

        from cfx_plugins.nets.features import rgb

        recs = run.explained(required=True)
        steps = int_option(context, "cout_steps", "CFX_COUT_STEPS", 50)
        clf = context.classifier()
        labels = list(clf.labels)
        device = context.device

        def predict(batch):
            return clf.predict_proba(batch.to(device)).cpu()

        scores, unchanged = [], 0
        with torch.no_grad():
            for r in recs:
                try:
                    s, t = _class_index(labels, r["source_label"]), _class_index(labels, r["target_label"])
                except ValueError:
                    raise MetricUnavailable(
                        f"labels {r['source_label']!r}/{r['target_label']!r} of {r['id']} are not classes of "
                        f"{clf.spec}") from None
                x, cf = (torch.from_numpy(rgb(run.image(r[k]))).permute(2, 0, 1).float()
                         for k in ("original", "counterfactual"))
                unchanged += bool((x == cf).all())
                scores.append(cout_score(predict, x, cf, s, t, steps))
        return {"cout": float(np.mean(scores)), "cout_unchanged": unchanged}


@hookimpl
def register_metrics(register):
    register(COUT)
