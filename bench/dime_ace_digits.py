"""DiME and ACE on the embedded demo: flip rate, closeness to the input vs the nearest target-class training digit,
NFE and seconds per image.

    OMP_NUM_THREADS=1 python bench/dime_ace_digits.py [--methods dime,ace] [--model SPEC] [--set KEY=VALUE ...]
                                                      [--limit N] [--out DIR] [--batch-size N]

Runs ``cfx explain`` in-process on ``cfx_cli/demo/images`` (16 digits, target auto) with the demo classifier
and (unless --model is given) the demo pixel DDPM, each method with its ``digits`` preset. For every record:
ℓ1 = mean |x − x'| over pixels in [0, 1] (the saved PNGs), and the reference ℓ1 = min over the training
images of the target class of mean |x − t| (the demo's training split). Prints one row per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def nearest_target_l1(original: np.ndarray, target: int, x_train: np.ndarray, y_train: np.ndarray) -> float:
    """Mean-absolute distance from ``original`` (H, W, 3) to the closest training image of class ``target``."""
    pool = x_train[y_train == target].transpose(0, 2, 3, 1)
    return float(np.abs(pool - original[None]).mean(axis=(1, 2, 3)).min())


def summarise(run_dir: Path, x_train: np.ndarray, y_train: np.ndarray) -> dict:
    from cfx_cli.images import decode

    recs = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    done = [r for r in recs if r["status"] in ("flipped", "not_flipped")]
    rows = []
    for r in done:
        orig = decode(run_dir / r["original"])
        cf = decode(run_dir / r["counterfactual"])
        rows.append({"flipped": r["status"] == "flipped", "l1": float(np.abs(cf - orig).mean()),
                     "ref": nearest_target_l1(orig, int(r["target_label"]), x_train, y_train),
                     "nfe": r["nfe"], "seconds": r["seconds"], "attempt": (r["params"] or {}).get("attempt", 1)})
    flipped = [x for x in rows if x["flipped"]]

    def mean(key, items):
        return statistics.fmean(x[key] for x in items) if items else float("nan")

    return {"n": len(rows), "errors": sum(r["status"] == "error" for r in recs),
            "flip_rate": len(flipped) / len(rows) if rows else 0.0,
            "l1_all": mean("l1", rows), "l1_flipped": mean("l1", flipped), "ref_all": mean("ref", rows),
            "ref_flipped": mean("ref", flipped), "nfe_median": statistics.median(x["nfe"] for x in rows),
            "seconds_median": statistics.median(x["seconds"] for x in rows)}


def run(method: str, out: Path, model: str | None, sets: dict, limit: int | None, batch_size: int,
        seed: int = 0) -> Path:
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explain.pipeline import run_explain
    from cfx_cli.explain.request import ExplainRequest

    req = ExplainRequest(inputs=[str(IMAGES_DIR)], method=method, out=str(out), overwrite=True, model=model,
                         set_options=dict(sets), limit=limit, batch_size=batch_size, seed=seed, device="cpu")
    summary = run_explain(req, progress_stream=open("/dev/null", "w"))  # noqa: SIM115 - closed at exit
    if summary.counts.get("error"):
        raise SystemExit(f"{method}: {summary.counts['error']} errors: {summary.errors[:1]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="dime,ace")
    ap.add_argument("--model", default=None, help="--model SPEC (default: the demo pixel DDPM)")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY=VALUE for every method")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="build/bench-dime-ace")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    import torch

    from cfx_cli.demo.data import load_split
    from cfx_cli.params import parse_set_options

    torch.set_num_threads(1)
    x_train, y_train, _, _ = load_split()
    results = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        run_dir = run(method, Path(args.out) / method, args.model, parse_set_options(args.sets), args.limit,
                      args.batch_size)
        results[method] = summarise(run_dir, x_train, y_train) | {"wall_seconds": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'method':6s} {'n':>3s} {'FR':>6s} {'ℓ1 all':>7s} {'ℓ1 flip':>7s} {'ref ℓ1':>7s} {'closer':>6s} "
          f"{'NFE med':>7s} {'s/img':>6s} {'wall s':>7s}")
    for method, r in results.items():
        closer = "yes" if r["l1_flipped"] < r["ref_flipped"] else "no"
        print(f"{method:6s} {r['n']:3d} {r['flip_rate']:6.1%} {r['l1_all']:7.4f} {r['l1_flipped']:7.4f} "
              f"{r['ref_flipped']:7.4f} {closer:>6s} {r['nfe_median']:7.0f} {r['seconds_median']:6.2f} "
              f"{r['wall_seconds']:7.1f}")
    print("ref ℓ1: mean over the flipped images of the ℓ1 to the nearest training digit of the target class",
          file=sys.stderr)


if __name__ == "__main__":
    main()
