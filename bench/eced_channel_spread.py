"""ECED on grayscale digits: flip rate, mean ℓ1 and channel spread of a cfx run (issue 22, `keep_gray`).

    python scripts/export_demo_digits.py --split tuning --limit 32 --out /tmp/tuning32
    cfx explain /tmp/tuning32 --method eced --target auto --seed 0 --classifier demo:digits --out runs/eced-on
    cfx explain /tmp/tuning32 --method eced --target auto --seed 0 --classifier demo:digits \\
        --set keep_gray=false --out runs/eced-off
    python bench/eced_channel_spread.py runs/eced-off runs/eced-on

Channel spread of an image: max over pixels of (max_c − min_c), in 8-bit levels (/255), on the saved PNGs. ℓ1: the
mean absolute difference of original and counterfactual over pixels and channels, in [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cfx_cli.images import decode


def spread(img: np.ndarray) -> float:
    """max over pixels of max_c − min_c of an (H, W, C) image in [0, 1], in 8-bit levels."""
    return float(np.round((img.max(-1) - img.min(-1)).max() * 255))


def summarise(run: Path) -> dict[str, float]:
    recs = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("counterfactual")]
    flips, l1, spreads, in_spreads = [], [], [], []
    for r in recs:
        cf, orig = decode(run / r["counterfactual"]), decode(run / r["original"])
        flips.append(r["status"] == "flipped")
        l1.append(float(np.abs(cf - orig).mean()))
        spreads.append(spread(cf))
        in_spreads.append(spread(orig))
    s = np.array(spreads)
    return {"n": len(recs), "flip_rate": float(np.mean(flips)), "l1": float(np.mean(l1)),
            "input_spread_max": float(max(in_spreads)), "spread_mean": float(s.mean()),
            "spread_max": float(s.max()), "over_4": int((s > 4).sum()), "over_20": int((s > 20).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| run | n | flip rate | mean ℓ1 | input spread (max) | spread mean | spread max | > 4/255 | > 20/255 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        m = summarise(run)
        print(f"| {run.name} | {m['n']} | {m['flip_rate']:.1%} | {m['l1']:.4f} | {m['input_spread_max']:.0f} | "
              f"{m['spread_mean']:.1f} | {m['spread_max']:.0f} | {m['over_4']} | {m['over_20']} |")


if __name__ == "__main__":
    main()
