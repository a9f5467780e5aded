"""FastDiME beside DiME on the embedded demo at the same τ: network evaluations per explanation, median seconds,
flip rate and ℓ1, one run, side by side.

    OMP_NUM_THREADS=1 python bench/fastdime_vs_dime.py [--limit N] [--tau T] [--variants fastdime,fastdime2+]
                                                       [--set KEY=VALUE ...] [--fastdime-set KEY=VALUE ...]
                                                       [--out DIR] [--json]

Each method runs in-process through ``cfx explain`` (bench/dime_ace_digits.py's ``run``) on the first N digits of
``cfx_cli/demo/images`` (target auto) with the demo classifier, the demo pixel DDPM and its ``digits`` preset,
``tau`` overridden to the same value for all. NFE = the manifest's ``nfe`` (prior evaluations + classifier
gradients, over all attempts). Ratios are DiME's / the variant's (NFE median, then seconds median and wall time).
The oracle flip rate (the realism protocol of the held-out digits) is not measured here yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _digits_bench():
    spec = importlib.util.spec_from_file_location("dime_ace_digits", BENCH / "dime_ace_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--tau", type=int, default=20, help="τ for every method (the digits presets use 20)")
    ap.add_argument("--variants", default="fastdime,fastdime2,fastdime2+")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY=VALUE for every method")
    ap.add_argument("--fastdime-set", action="append", default=[], dest="fsets",
                    help="KEY=VALUE for the FastDiME variants only (e.g. warmup=30 at --tau 60)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="build/bench-fastdime")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from cfx_cli.demo.data import load_split
    from cfx_cli.params import parse_set_options

    torch.set_num_threads(1)
    bench = _digits_bench()
    x_train, y_train, _, _ = load_split()
    common = parse_set_options(args.sets) | {"tau": str(args.tau)}
    fast = parse_set_options(args.fsets)
    runs = [("dime", "dime", {})] + [(v, "fastdime", fast | {"variant": v}) for v in args.variants.split(",") if v]
    results = {}
    for label, method, extra in runs:
        t0 = time.perf_counter()
        run_dir = bench.run(method, Path(args.out) / label.replace("+", "plus"), None, common | extra, args.limit,
                            args.batch_size)
        results[label] = bench.summarise(run_dir, x_train, y_train) | {"wall_seconds": time.perf_counter() - t0}
    base = results["dime"]
    for r in results.values():
        r["nfe_ratio"] = base["nfe_median"] / r["nfe_median"]
        r["seconds_ratio"] = base["seconds_median"] / r["seconds_median"]
        r["wall_ratio"] = base["wall_seconds"] / r["wall_seconds"]
    if args.json:
        print(json.dumps({"tau": args.tau, "limit": args.limit, "results": results}, indent=2))
        return
    print(f"τ = {args.tau}, {args.limit} demo digits, batch {args.batch_size}, 1 CPU thread")
    print("| method | n | FR | ℓ1 flipped | NFE median | NFE ratio | s/img median | s ratio | wall s | wall ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['n']} | {r['flip_rate']:.0%} | {r['l1_flipped']:.4f} | {r['nfe_median']:.0f} | "
              f"{r['nfe_ratio']:.2f}× | {r['seconds_median']:.3f} | {r['seconds_ratio']:.2f}× | "
              f"{r['wall_seconds']:.1f} | {r['wall_ratio']:.2f}× |")


if __name__ == "__main__":
    main()
