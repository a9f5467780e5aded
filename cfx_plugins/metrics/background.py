"""Background MSE (ECED supplement eq. 12): how much a counterfactual changed outside its mask.

L_bg = (1/|B|) Σ_{(i,j)∈B} MSE(x_cf[i,j], x[i,j]), B the pixels outside the mask (mask < 0.5; the mask
marks the region allowed to change), the per-pixel MSE taken over channels in [0, 1]; averaged over the
explained inputs that have a mask (``RUN_DIR/masks/``, written by methods with a region or ``--mask``).
"""

from __future__ import annotations

import numpy as np

from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric


class BackgroundMSE(Metric):
    name = "bg_mse"
    summary = "mean squared error outside the mask (the region not allowed to change; ECED eq. 12)"
    needs = frozenset({"masks"})
    default = False
    lower_is_better = True
    unranked = frozenset({"bg_mse_n"})

    def compute(self, run, context):
        recs = [r for r in run.explained() if r.get("mask")]
        if not recs:
            raise MetricUnavailable("the run has no masks (methods with a region, or --mask)")
        values = []
        for r in recs:
            x, cf = run.image(r["original"]), run.image(r["counterfactual"])
            m = run.image(r["mask"])
            background = (m.mean(axis=2) if m.ndim == 3 else m) < 0.5
            if not background.any():
                continue  # the mask covers the whole image: no background to preserve
            # eq. 12: per-pixel MSE over channels, averaged over the background pixels
            values.append(float(((cf - x) ** 2).mean(axis=2)[background].mean()))
        if not values:
            raise MetricUnavailable("every mask covers the whole image: no background")
        return {"bg_mse": float(np.mean(values)), "bg_mse_n": len(values)}


@hookimpl
def register_metrics(register):
    register(BackgroundMSE)
