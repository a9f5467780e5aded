"""The FID trace term three ways on 2048-d features, side by side: cfx's low-rank form (N < D), cfx's
covariance form (symmetric eigendecompositions) and scipy's ``sqrtm`` (pytorch-fid's reference).

    .venv/bin/python bench/fid_trace.py [--runs 5] [--sizes 100,500,1000]

Prints, per set size N (originals and counterfactuals alike), the median wall seconds of each, the ratio to
scipy, and the largest relative difference of the FID values from scipy's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    from scipy import linalg

    from cfx_plugins.metrics.fid import fid_from_features, frechet_distance, gaussian_stats

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="100,500,1000")
    args = parser.parse_args()

    def scipy_fid(a, b):
        mu1, s1 = gaussian_stats(a)
        mu2, s2 = gaussian_stats(b)
        covmean = linalg.sqrtm(s1 @ s2).real
        d = mu1 - mu2
        return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    cases = {
        "cfx low-rank (N < D)": fid_from_features,
        "cfx covariance eigh": lambda a, b: frechet_distance(*gaussian_stats(a), *gaussian_stats(b)),
        "scipy sqrtm": scipy_fid,
    }
    print(f"{'N':>5s} {'method':24s} {'median s':>9s} {'× scipy':>8s} {'max rel Δ vs scipy':>19s}")
    rng = np.random.default_rng(0)
    for n in (int(x) for x in args.sizes.split(",")):
        a = rng.normal(size=(n, 2048))
        b = rng.normal(size=(n, 2048)) * 1.1 + 0.05
        times = {k: [] for k in cases}
        values = {k: [] for k in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():  # interleaved
                t0 = time.perf_counter()
                values[name].append(fn(a, b))
                times[name].append(time.perf_counter() - t0)
        ref_t = statistics.median(times["scipy sqrtm"])
        ref_v = values["scipy sqrtm"][0]
        for name in cases:
            med = statistics.median(times[name])
            rel = max(abs(v - ref_v) / abs(ref_v) for v in values[name])
            print(f"{n:5d} {name:24s} {med:9.3f} {med / ref_t:8.3f} {rel:19.2e}")


if __name__ == "__main__":
    main()
