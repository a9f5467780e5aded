"""RCSB ablation on the embedded demo, mirroring the paper's Fig. 3: naive guidance, + Tweedie, + Adam
stabilization, + adaptive normalization, + trajectory truncation (the full method). Flip rate, ℓ1, seconds.

    OMP_NUM_THREADS=1 python bench/rcsb_ablation.py [--area 0.3] [--limit N] [--out DIR] [--set KEY=VALUE ...]

Runs ``cfx explain --method rcsb`` in-process on ``cfx_cli/demo/images`` (16 digits, target auto) with the demo
classifier, the demo bridge and automatic regions (a = --area), each row with the ``digits`` preset plus the
switches below. Rows without truncation start from x_1 (τ = 1). Row scales: as in the paper, the rows without
adaptive normalization are run at each s of --naive-scales (default 0.05 and 1.0): without normalization the
step size depends on the raw gradient (or, with Adam, on √|R|), and the paper had to lower s to ~1e-2 there.
ℓ1 = mean |x − x'| over all pixels in [0, 1] of the saved PNGs; "outside R" = max |x − x'| outside the region.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def rows(naive_scales: list[float], scale: float, tau: float) -> list[tuple[str, dict]]:
    base = {"tau": 1.0}
    out = []
    for ns in naive_scales:  # the unnormalized rows depend strongly on s: one block per s
        out += [
            (f"naive guidance (s={ns:g})", {**base, "tweedie": False, "adam": False, "adaptive_norm": False,
                                            "scale": ns}),
            (f"+ Tweedie (s={ns:g})", {**base, "tweedie": True, "adam": False, "adaptive_norm": False, "scale": ns}),
            (f"+ Adam stabilization (s={ns:g})", {**base, "tweedie": True, "adam": True, "adaptive_norm": False,
                                                  "scale": ns}),
        ]
    return out + [
        (f"+ adaptive norm. (s={scale:g})", {**base, "tweedie": True, "adam": True, "adaptive_norm": True,
                                             "scale": scale}),
        (f"+ truncation (τ={tau:g}, s={scale:g})", {"tau": tau, "tweedie": True, "adam": True,
                                                     "adaptive_norm": True, "scale": scale}),
    ]


def summarise(run_dir: Path) -> dict:
    from cfx_cli.images import decode

    recs = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    done = [r for r in recs if r["status"] in ("flipped", "not_flipped")]
    l1, outside, area = [], [], []
    for r in done:
        orig = decode(run_dir / r["original"])
        cf = decode(run_dir / r["counterfactual"])
        mask = decode(run_dir / r["mask"]).mean(axis=2) > 0.5
        l1.append(float(np.abs(cf - orig).mean()))
        outside.append(float(np.abs(cf - orig)[~mask].max()) if (~mask).any() else 0.0)
        area.append(float(mask.mean()))
    n = len(done)
    return {"n": n, "errors": len(recs) - n, "flip_rate": sum(r["status"] == "flipped" for r in done) / max(n, 1),
            "l1": statistics.fmean(l1) if l1 else float("nan"), "outside": max(outside, default=0.0),
            "area": statistics.fmean(area) if area else float("nan"),
            "seconds": statistics.median(r["seconds"] for r in done) if done else float("nan")}


def main() -> None:
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explain.pipeline import run_explain
    from cfx_cli.explain.request import ExplainRequest
    from cfx_cli.params import parse_set_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--area", type=float, default=0.3)
    ap.add_argument("--scale", type=float, default=None, help="s for the normalized rows (default: preset)")
    ap.add_argument("--naive-scales", default="0.05,1.0", help="s values for the rows without adaptive "
                    "normalization (comma list; one block of rows each)")
    ap.add_argument("--tau", type=float, default=0.6)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="/tmp/cfx-rcsb-ablation")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    extra = parse_set_options(args.set)
    from cfx_plugins.explainers.rcsb import RCSB

    scale = args.scale if args.scale is not None else RCSB.presets["digits"]["scale"]
    print(f"RCSB ablation: demo digits, demo:bridge, --region auto (a = {args.area}), target auto")
    print(f"{'configuration':36s} {'n':>3s} {'FR':>6s} {'ℓ1':>7s} {'area':>6s} {'max|Δ| out':>10s} {'s/img':>7s}")
    naive = [float(v) for v in args.naive_scales.split(",")]
    for k, (label, sets) in enumerate(rows(naive, scale, args.tau)):
        out = Path(args.out) / f"row{k}"
        req = ExplainRequest(inputs=[str(IMAGES_DIR)], method="rcsb", out=str(out), overwrite=True,
                             set_options={"region_area": args.area, **sets, **extra}, limit=args.limit,
                             batch_size=16, mask="auto", device="cpu")
        t0 = time.perf_counter()
        run_explain(req)
        s = summarise(out)
        wall = time.perf_counter() - t0
        print(f"{label:36s} {s['n']:3d} {s['flip_rate']:6.1%} {s['l1']:7.4f} {s['area']:6.3f} "
              f"{s['outside']:10.4f} {s['seconds']:7.2f}  (wall {wall:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
