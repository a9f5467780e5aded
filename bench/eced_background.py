"""ECED with and without Alg. 2 (background preservation) on the embedded demo: background MSE (supplement
eq. 12), flip rate, seconds per image.

    OMP_NUM_THREADS=1 python bench/eced_background.py [--limit N] [--out DIR] [--set KEY=VALUE ...]

Runs ``cfx explain cfx_cli/demo/images --method eced --target auto --classifier demo:digits`` in-process (the
``digits`` preset plus the --set values), once with ``preserve_background=true`` and once with ``false``, with
the same run seeds (default 0, 1, 2, pooled), so the same key regions. bg MSE is eq. 12 on the saved PNGs: the per-pixel
MSE over channels in [0, 1], averaged over the pixels outside the key region (the run's masks), per image;
the table gives the median over images and the mean (what ``cfx eval --metrics bg_mse`` reports). s/image is the
explain time (models loaded) divided by the number of images, measured in the same process one row after the
other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np


def eq12(run_dir: Path) -> list[float]:
    from cfx_cli.images import decode

    out = []
    for line in (run_dir / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] not in ("flipped", "not_flipped"):
            continue
        x, cf = decode(run_dir / r["original"]), decode(run_dir / r["counterfactual"])
        bg = decode(run_dir / r["mask"]).mean(axis=2) < 0.5
        if bg.any():
            out.append(float(((cf - x) ** 2).mean(axis=2)[bg].mean()))
    return out


def run(out: Path, sets: dict, limit: int | None, seed: int = 0) -> dict:
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explain.pipeline import run_explain
    from cfx_cli.explain.request import ExplainRequest

    req = ExplainRequest(inputs=[str(IMAGES_DIR)], method="eced", target="auto", classifier="demo:digits",
                         out=str(out), batch_size=16, set_options=dict(sets), limit=limit, overwrite=True,
                         seed=seed)
    summary = run_explain(req)
    info = json.loads((out / "run.json").read_text())
    n = info["timings"]["inputs_processed"]
    values = eq12(out)
    return {"n": n, "flipped": summary.counts["flipped"], "bg": values,
            "seconds": info["timings"]["explain_seconds"]}


def run_seeds(base: Path, sets: dict, limit: int | None, seeds: int) -> dict:
    """Pool the images of ``seeds`` runs (run seeds 0 … seeds−1: other key-region noise draws, Alg. 2 noise
    and chain noise; the regions themselves do not depend on the seed)."""
    runs = [run(base / f"seed-{s}", sets, limit, s) for s in range(seeds)]
    n = sum(r["n"] for r in runs)
    bg = [v for r in runs for v in r["bg"]]
    return {"n": n, "flip_rate": sum(r["flipped"] for r in runs) / max(n, 1), "bg_median": statistics.median(bg),
            "bg_mean": float(np.mean(bg)), "s_per_image": sum(r["seconds"] for r in runs) / max(n, 1), "bg": bg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per row with run seeds 0..N-1 (pooled)")
    ap.add_argument("--no-attack-rows", action="store_true",
                    help="also run both rows with iterations=0: the blended chain's first image I^(0), no attack")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    sets = dict(item.split("=", 1) for item in args.set)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="eced-bench-"))
    rows = []
    for label, flag in (("with Alg. 2 (preserve_background=true)", "true"),
                        ("without Alg. 2 (preserve_background=false)", "false")):
        res = run_seeds(base / f"preserve-{flag}", {**sets, "preserve_background": flag}, args.limit, args.seeds)
        rows.append((label, res))
    print(f"ECED on the demo digits ({rows[0][1]['n']} explanations = {args.seeds} seeds × the demo images, target "
          f"auto, demo:digits, demo:latent, preset digits {sets or ''}); runs in {base}")
    print()
    print("| row | bg MSE eq. 12 (median) | bg MSE (mean) | flip rate | s/image |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['bg_median']:.6f} | {r['bg_mean']:.6f} | {r['flip_rate']:.1%} | "
              f"{r['s_per_image']:.2f} |")
    if args.no_attack_rows:
        for label, flag in (("T₂ = 0, with Alg. 2", "true"), ("T₂ = 0, without Alg. 2", "false")):
            res = run_seeds(base / f"t0-preserve-{flag}", {**sets, "preserve_background": flag, "iterations": 0},
                            args.limit, args.seeds)
            print(f"| {label} | {res['bg_median']:.6f} | {res['bg_mean']:.6f} | {res['flip_rate']:.1%} | "
                  f"{res['s_per_image']:.2f} |")
    with_, without = rows[0][1], rows[1][1]
    print()
    print(f"ratio bg MSE (median) without / with Alg. 2: {without['bg_median'] / max(with_['bg_median'], 1e-12):.2f}×")
    lower = sum(a < b for a, b in zip(with_["bg"], without["bg"], strict=True))
    print(f"explanations whose bg MSE is lower with Alg. 2 (paired by image and seed): {lower}/{len(with_['bg'])}")


if __name__ == "__main__":
    main()
