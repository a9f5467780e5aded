"""The basic metrics: flip rate, target probability after, ℓ1, ℓ2, seconds and NFEs per explanation."""

from __future__ import annotations

import statistics

from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


class FlipRate(Metric):
    name = "flip_rate"
    summary = "share of explained inputs whose counterfactual the classifier assigns to the target (FR)"
    lower_is_better = False

    def compute(self, run, context):
        recs = run.explained(required=True)
        return {"flip_rate": sum(r["status"] == "flipped" for r in recs) / len(recs)}


class TargetProb(Metric):
    name = "target_prob"
    summary = "mean target-class probability of the counterfactuals (before → after)"
    lower_is_better = False
    unranked = frozenset({"target_prob_before"})  # describes the inputs, not the method

    def compute(self, run, context):
        recs = run.explained(required=True)
        if any(r.get("target_prob_before") is None or r.get("target_prob_after") is None for r in recs):
            raise MetricUnavailable("the run records no probabilities (e.g. a folder in the ACE layout)")
        return {"target_prob_before": _mean([r["target_prob_before"] for r in recs]),
                "target_prob_after": _mean([r["target_prob_after"] for r in recs])}


class Distances(Metric):
    name = "distance"
    summary = "mean per-pixel ℓ1 and ℓ2 (RMS) between original and counterfactual, in [0, 1]"
    lower_is_better = True

    def compute(self, run, context):
        import numpy as np

        recs = run.explained(required=True)
        l1, l2 = [], []
        for r in recs:
            d = run.image(r["counterfactual"]) - run.image(r["original"])
            l1.append(float(np.abs(d).mean()))
            l2.append(float(np.sqrt((d ** 2).mean())))
        return {"l1": _mean(l1), "l2": _mean(l2)}


class Efficiency(Metric):
    name = "efficiency"
    summary = "seconds and network evaluations per explanation (hardware: run.json device_name)"
    lower_is_better = True
    unranked = frozenset({"hardware"})

    def compute(self, run, context):
        recs = [r for r in run.explained() if r.get("seconds") is not None]
        if not recs:
            raise MetricUnavailable("no timed explanations in the run")
        return {"seconds": _mean([r["seconds"] for r in recs]),
                "nfe": _mean([r["nfe"] for r in recs if r.get("nfe") is not None]),
                # the hardware the seconds were measured on (run.json device_name, else device)
                "hardware": run.info.get("device_name") or run.info.get("device")}


@hookimpl
def register_metrics(register):
    for cls in (FlipRate, TargetProb, Distances, Efficiency):
        register(cls)
