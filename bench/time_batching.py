"""TIME: per-image seconds of the counterfactual step at batch 1 vs batch N, per backend (side by side, medians).

    python bench/time_batching.py [--model demo:latent] [--tokens TOKENS] [--batch 16] [--repeats 3]
                                  [--backends torch,onnx] [--threads N]

Runs one (τ, w) attempt (no classifier, no retries) on the demo images so that only the generative work is
timed: encode + EDICT inversion + EDICT denoising + decode. --tokens defaults to the demo's shipped tokens for
demo:latent. Prints a table.

Backends (``--backend`` of ``cfx explain --method time``, via ``LatentModel.use_backend``): ``torch`` (eager fp32,
the modules' own calls: the reference) and ``onnx`` (the forward-only UNet and VAE calls on ONNX Runtime; export
and parity gate go to a temporary cache and happen before timing). In each round every (backend, batch) pair
runs in turn, so they share the machine's conditions. × torch = torch's median ÷ this row's at the same batch;
max |Δ| = the largest difference between this backend's counterfactual images (in [0, 1]) and torch's at the
same batch size; the last line compares torch's batch-N images with its batch-1 images.

FLOPs per explanation: matmul/conv/attention FLOPs (bench/flops.py) of that step for one image on torch (the
prompt embeddings are cached, as in a run; every backend does the same arithmetic). Share of peak: FLOPs ÷
seconds per image ÷ this machine's fp32 matmul rate (torch.mm, same thread count) measured at the start of the
run — an achievable rate, not a datasheet number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

from flops import count_flops, fmt_flops, measure_sgemm_peak, share_of_peak

from cfx_cli.explainers import RunOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo:latent")
    ap.add_argument("--tokens", default=None, help="TIME tokens (default: the demo's, for demo:latent)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tau", type=int, default=20)
    ap.add_argument("--w", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx (torch always runs)")
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0 = torch's default)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from cfx_cli.demo import DEMO_DIR, IMAGES_DIR
    from cfx_cli.images import decode, discover
    from cfx_cli.models import load_model
    from cfx_plugins.explainers.time import tokens as T
    from cfx_plugins.explainers.time.fit import install_artifact
    from cfx_plugins.explainers.time.generate import TimeGenerator
    from cfx_plugins.explainers.time.schedule import guidance_scale

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens
    if tokens is None:
        if args.model != "demo:latent":
            raise SystemExit("--tokens FILE is needed for models other than demo:latent")
        tokens = str(DEMO_DIR / "models" / "latent" / "time-tokens-digits")
    vectors, meta = T.load_artifact(tokens)
    model = load_model(args.model, expect="latent")
    install_artifact(model, vectors, meta)
    gen = TimeGenerator(model, meta)
    items = discover([str(IMAGES_DIR)])
    imgs = torch.from_numpy(np.stack([decode(it.path) for it in items])).permute(0, 3, 1, 2).float()
    reps = (args.batch + len(imgs) - 1) // len(imgs)
    imgs = imgs.repeat(reps, 1, 1, 1)[: args.batch]
    n_cls = len(meta["labels"])
    src = torch.arange(args.batch) % n_cls
    tgt = (src + 1) % n_cls

    # one model, its forward-only calls switched between backends (model.forward = None: the modules themselves)
    names = ["torch"] + [b for b in args.backends.split(",") if b and b != "torch"]
    forwards, described = {"torch": None}, {"torch": "torch (fp32, modules' own calls)"}
    tmp = tempfile.TemporaryDirectory(prefix="cfx-bench-")
    os.environ["CFX_CACHE_DIR"] = tmp.name  # fresh exports, not the user's ~/.cache/cfx
    for b in names[1:]:
        if not hasattr(model, "use_backend"):
            raise SystemExit(f"--backends {b}: this cfx has no TIME backend (LatentModel.use_backend)")
        t0 = time.perf_counter()
        described[b] = model.use_backend(SimpleNamespace(options=RunOptions(backend=b), device="cpu"))
        forwards[b] = model.forward
        print(f"{b}: {described[b]} (export + gate {time.perf_counter() - t0:.1f}s)")

    g = guidance_scale(args.w, "w")  # TIME's default convention (the authors' code): g = w

    def run(b: str, n: int) -> tuple[float, torch.Tensor]:
        model.forward = forwards[b]
        outs = []
        t0 = time.perf_counter()
        for s in range(0, args.batch, n):
            lat = gen.encode(imgs[s: s + n])
            outs.append(gen.counterfactuals(lat, src[s: s + n], tgt[s: s + n], args.tau, g, args.steps, 0.93,
                                            "exact", tuple(imgs.shape[-2:])))
        return (time.perf_counter() - t0) / args.batch, torch.cat(outs)

    for b in names:  # warm-up (also caches the prompt embeddings)
        run(b, args.batch)

    def one_image():
        model.forward = None
        lat = gen.encode(imgs[:1])
        gen.counterfactuals(lat, src[:1], tgt[:1], args.tau, g, args.steps, 0.93, "exact",
                            tuple(imgs.shape[-2:]))

    flops, _ = count_flops(one_image)
    peak = measure_sgemm_peak()
    batches = (1, args.batch)
    times: dict[tuple[str, int], list[float]] = {(b, n): [] for b in names for n in batches}
    cfs: dict[tuple[str, int], torch.Tensor] = {}
    for _ in range(args.repeats):
        for n in batches:
            for b in names:
                dt, out = run(b, n)
                times[(b, n)].append(dt)
                cfs[(b, n)] = out
    tmp.cleanup()
    print(f"TIME counterfactual step, model {args.model}, τ={args.tau}/{args.steps}, {args.batch} images, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(peak.describe())
    print(f"FLOPs per explanation: {fmt_flops(flops)}")
    print(f"{'backend':<34} {'batch':>5} {'s/image':>8} {'min':>7} {'max':>7} {'× batch 1':>9} {'× torch':>8} "
          f"{'GFLOP/s':>8} {'% peak':>7} {'max |Δ|':>8}")
    for b in names:
        base = statistics.median(times[(b, 1)])
        for n in batches:
            diff = float((cfs[(b, n)] - cfs[("torch", n)]).abs().max())
            t = times[(b, n)]
            med = statistics.median(t)
            ref = statistics.median(times[("torch", n)])
            print(f"{described[b]:<34} {n:>5} {med:>8.4f} {min(t):>7.4f} {max(t):>7.4f} {base / med:>8.2f}x "
                  f"{ref / med:>7.2f}x {flops / med / 1e9:>8.2f} {share_of_peak(flops, med, peak):>7.1%} "
                  f"{diff:>8.1e}")
    batching = float((cfs[("torch", args.batch)] - cfs[("torch", 1)]).abs().max())
    print(f"torch batch {args.batch} vs batch 1: max |Δ| {batching:.1e}")


if __name__ == "__main__":
    main()
