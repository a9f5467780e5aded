"""DiME and ACE: seconds per explanation per backend, with the ratio against plain fp32 eager torch measured in
the same run, FLOPs per explanation and the share of the machine's measured fp32 matmul peak.

    OMP_NUM_THREADS=1 python bench/dime_ace_speed.py [--methods dime,ace] [--images 4] [--repeats 3] [--threads 1]
                                                     [--dime KEY=VALUE ...] [--ace KEY=VALUE ...]
                                                     [--no-channels-last]

Setting: the demo classifier (demo:digits), the demo pixel DDPM (demo:pixel), the first --images demo digits
as one batch, target auto (the most probable other class), seed 0; each method with its ``digits`` preset
(what ``cfx explain`` picks for demo:digits) plus the --dime/--ace overrides. The explainers are built and
called in-process (``Explainer.explain`` on one batch), so the times exclude loading, PNG writing and the
final classification; they include every retry the method makes.

Variants, each a separate explainer: ``torch`` (``--backend torch``: the model's own eager fp32 call, the
reference), ``torch channels_last`` (the forward-only calls through ``TorchBackend(channels_last=True)``) and
``onnx`` (``--backend onnx``: the forward-only calls on ONNX Runtime; the export goes to a temporary cache, so
its build and parity gate are part of the first, untimed call). Which calls that covers: DiME — every prior
call (the guided step's and the unguided chains producing x_t; the classifier gradient stays in torch); ACE —
only the τ refinement steps (the attack differentiates through the diffusion filter, in torch).

Timing: one warm-up call per variant, then --repeats rounds calling the variants in turn (same machine
conditions); the median of (batch seconds / images) is reported. FLOPs per explanation: matmul/conv/attention
FLOPs (forward and the backward passes the method takes; bench/flops.py) of the torch variant's call divided
by the number of images — the same arithmetic the other variants do (ONNX Runtime's kernels are invisible to
torch's counter). Share of peak: FLOPs ÷ seconds ÷ the fp32 matmul rate measured at the start of the run with
the same thread count. Parity: max |counterfactual − torch's| over all images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from flops import count_flops, fmt_flops, measure_sgemm_peak, share_of_peak


def demo_batch(classifier, n: int, seed: int = 0):
    """The first ``n`` demo digits with target auto, as the pipeline would batch them."""
    import numpy as np
    import torch

    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explain.batch import image_seed
    from cfx_cli.explainers import ExplainBatch
    from cfx_cli.images import decode, discover

    items = discover([str(IMAGES_DIR)])[:n]
    images = torch.from_numpy(np.stack([decode(it.path) for it in items])).permute(0, 3, 1, 2).contiguous()
    probs = classifier.predict_proba(images)
    src = probs.argmax(1)
    masked = probs.clone()
    masked[torch.arange(len(src)), src] = -1.0
    return ExplainBatch(ids=[it.id for it in items], images=images, targets=masked.argmax(1), sources=src,
                        seeds=[image_seed(seed, it.id) for it in items])


def make_explainer(method: str, classifier, sets: dict, options: dict):
    from cfx_cli.explainers import ExplainContext, RunOptions
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    cls = get_explainer_class(method)
    set_options = {"preset": cls.auto_presets["demo:digits"], **sets}
    params = resolve_params(method, cls.params, cls.presets, set_options)
    context = ExplainContext(classifier=classifier, params=params, device="cpu", options=RunOptions(**options))
    return cls(context), params


VARIANTS = (("torch", {"backend": "torch"}),
            ("torch channels_last", {"backend": "torch", "channels_last": True}),
            ("onnx", {"backend": "onnx"}))


def bench_method(method: str, classifier, batch, sets: dict, args, peak) -> tuple[list, list[str]]:
    import torch

    variants = [(name, opts) for name, opts in VARIANTS if args.channels_last or "channels_last" not in opts]
    explainers, notes, firsts, outs = {}, [], {}, {}
    for name, opts in variants:
        explainers[name], params = make_explainer(method, classifier, sets, opts)
    n = len(batch.ids)
    for name, _ in variants:  # warm-up; the onnx variant exports and gates here
        t0 = time.perf_counter()
        outs[name] = explainers[name].explain(batch)
        firsts[name] = time.perf_counter() - t0
    flops_batch, _ = count_flops(explainers["torch"].explain, batch)
    flops = flops_batch / n
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, _ in variants:
            t0 = time.perf_counter()
            outs[name] = explainers[name].explain(batch)
            times[name].append((time.perf_counter() - t0) / n)
    ref_cf = torch.stack([o.counterfactual for o in outs["torch"]])
    ref_med = statistics.median(times["torch"])
    rows = []
    for name, _ in variants:
        med = statistics.median(times[name])
        cf = torch.stack([o.counterfactual for o in outs[name]])
        diff = float((cf - ref_cf).abs().max())
        backend_name = outs[name][0].params.get("backend", "?")
        attempts = sum(int(o.params.get("attempt", 1)) for o in outs[name])
        rows.append((method, name, backend_name, med, ref_med / med, flops, flops / med,
                     share_of_peak(flops, med, peak), diff, attempts, min(times[name]), max(times[name])))
        notes.append(f"{method} {name}: first call {firsts[name]:.1f}s (incl. any export + parity gate)")
    shown = {k: params[k] for k in ("tau", "respacing", "scales", "iterations", "lambda_p", "perceptual")
             if k in params}
    notes.append(f"{method} params: preset {cls_preset(method)} + {sets or 'no overrides'} → {shown}")
    return rows, notes


def cls_preset(method: str) -> str:
    from cfx_cli.plugins import get_explainer_class

    return get_explainer_class(method).auto_presets["demo:digits"]


def parse_sets(items: list[str]) -> dict:
    from cfx_cli.params import parse_set_options

    return parse_set_options(items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="dime,ace")
    ap.add_argument("--images", type=int, default=4, help="demo digits explained as one batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--dime", action="append", default=[], metavar="KEY=VALUE", help="DiME --set override")
    ap.add_argument("--ace", action="append", default=[], metavar="KEY=VALUE", help="ACE --set override")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cfx-bench-") as cache:
        os.environ["CFX_CACHE_DIR"] = cache  # fresh exports, not the user's ~/.cache/cfx
        from cfx_cli.classifiers import ClassifierOptions, load_classifier

        classifier = load_classifier("demo:digits", ClassifierOptions(device="cpu"))
        batch = demo_batch(classifier, args.images)
        peak = measure_sgemm_peak()
        rows, notes = [], []
        for method in args.methods.split(","):
            sets = parse_sets(getattr(args, method, []) or [])
            r, nt = bench_method(method, classifier, batch, sets, args, peak)
            rows += r
            notes += nt
        peak_after = measure_sgemm_peak()

    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} thread(s); "
          f"{len(batch.ids)} demo images in one batch; median of {args.repeats} rounds")
    print(peak.describe())
    print(f"(re-measured after the run: {peak_after.flops_per_s / 1e9:.1f} GFLOP/s)")
    print(f"{'method':6} {'variant':20} {'backend (as recorded)':24} {'s/expl':>8} {'× eager':>8} "
          f"{'FLOPs/expl':>11} {'GFLOP/s':>8} {'% peak':>7} {'max|Δcf|':>9} {'attempts':>8} {'min':>7} {'max':>7}")
    for (method, name, bname, med, ratio, fl, rate, share, diff, attempts, lo, hi) in rows:
        print(f"{method:6} {name:20} {bname:24} {med:8.3f} {ratio:8.2f} {fmt_flops(fl):>11} {rate / 1e9:8.2f} "
              f"{share:7.1%} {diff:9.1e} {attempts:8d} {lo:7.3f} {hi:7.3f}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
