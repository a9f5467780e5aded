"""TIME: per-image seconds of the counterfactual step at batch 1 vs batch N (side by side, medians).

    python bench/time_batching.py --model demo:digits --tokens TOKENS [--batch 16] [--repeats 3]

Runs one (τ, w) attempt (no classifier, no retries) on the demo images so that only the generative work is
timed: encode + EDICT inversion + EDICT denoising + decode. Prints a table.

FLOPs per explanation: matmul/conv/attention FLOPs (bench/flops.py) of that step for one image (the prompt
embeddings are cached, as in a run). Share of peak: FLOPs ÷ seconds per image ÷ this machine's fp32 matmul rate
(torch.mm, same thread count) measured at the start of the run — an achievable rate, not a datasheet number.
"""

from __future__ import annotations

import argparse
import statistics
import time

from flops import count_flops, fmt_flops, measure_sgemm_peak, share_of_peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo:digits")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tau", type=int, default=20)
    ap.add_argument("--w", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from cfx_plugins.time import tokens as T
    from cfx_plugins.time.components import load_latent_t2i
    from cfx_plugins.time.fit import install_artifact
    from cfx_plugins.time.generate import TimeGenerator

    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.images import decode, discover

    if args.threads:
        torch.set_num_threads(args.threads)
    vectors, meta = T.load_artifact(args.tokens)
    model = load_latent_t2i(args.model)
    install_artifact(model, vectors, meta)
    gen = TimeGenerator(model, meta)
    items = discover([str(IMAGES_DIR)])
    imgs = torch.from_numpy(np.stack([decode(it.path) for it in items])).permute(0, 3, 1, 2).float()
    reps = (args.batch + len(imgs) - 1) // len(imgs)
    imgs = imgs.repeat(reps, 1, 1, 1)[: args.batch]
    n_cls = len(meta["labels"])
    src = torch.arange(args.batch) % n_cls
    tgt = (src + 1) % n_cls

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for s in range(0, args.batch, n):
            lat = gen.encode(imgs[s: s + n])
            gen.counterfactuals(lat, src[s: s + n], tgt[s: s + n], args.tau, args.w, args.steps, 0.93, "exact",
                                tuple(imgs.shape[-2:]))
        return (time.perf_counter() - t0) / args.batch

    run(args.batch)  # warm-up (also caches the prompt embeddings)

    def one_image():
        lat = gen.encode(imgs[:1])
        gen.counterfactuals(lat, src[:1], tgt[:1], args.tau, args.w, args.steps, 0.93, "exact",
                            tuple(imgs.shape[-2:]))

    flops, _ = count_flops(one_image)
    peak = measure_sgemm_peak()
    rows = []
    for n in (1, args.batch):
        times = [run(n) for _ in range(args.repeats)]
        rows.append((n, statistics.median(times), min(times), max(times)))
    base = rows[0][1]
    print(f"TIME counterfactual step, model {args.model}, τ={args.tau}/{args.steps}, {args.batch} images, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(peak.describe())
    print(f"FLOPs per explanation: {fmt_flops(flops)}")
    print(f"{'batch':>6} {'s/image (median)':>17} {'min':>8} {'max':>8} {'speed-up':>9} {'GFLOP/s':>8} {'% peak':>7}")
    for n, med, lo, hi in rows:
        print(f"{n:>6} {med:>17.4f} {lo:>8.4f} {hi:>8.4f} {base / med:>8.2f}x {flops / med / 1e9:>8.2f} "
              f"{share_of_peak(flops, med, peak):>7.1%}")


if __name__ == "__main__":
    main()
