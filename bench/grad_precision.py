"""How far ``--precision`` and ``--channels-last`` move each method's counterfactuals, at its demo preset.

    OMP_NUM_THREADS=1 python bench/grad_precision.py [--methods pgd,rcsb,eced] [--limit 16] [--out result.json]

Every method explains the embedded README digits (``cfx_cli/demo/images``) with its demo preset once per variant
(``fp32``, the reference; ``bf16``; ``fp16``; ``channels_last``), through the pipeline ``cfx explain`` runs. Per
variant: flips, the median seconds per explanation and its ratio to fp32 (measured in this run; on a CPU without
half-precision matmul units the half variants are *slower*: the ratios that matter are a GPU's, bench/gpu_suite.py),
the max and mean |Δ| of the 8-bit counterfactuals from the fp32 ones, how many keep the fp32 run's predicted label,
and what the records say ran (``gradients``: autocast and the gate's largest measured error; ``backend`` for the
forward-only calls of DiME, ACE and TIME).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cfx_cli.demo import IMAGES_DIR
from cfx_cli.explain.pipeline import run_explain
from cfx_cli.explain.request import ExplainRequest
from cfx_cli.explainers import RunOptions

METHODS = ("pgd", "dime", "fastdime", "ace", "rcsb", "time", "eced")
VARIANTS = {"fp32": RunOptions(), "bf16": RunOptions(backend_precision="bf16"),
            "fp16": RunOptions(backend_precision="fp16"), "channels_last": RunOptions(channels_last=True),
            "compile": RunOptions(compile=True)}  # compile: minutes of inductor compiling on a CPU; ask for it
DEFAULT_VARIANTS = ("fp32", "bf16", "fp16", "channels_last")


def run(method: str, variant: str, out: Path, limit: int) -> list[dict]:
    options = VARIANTS[variant]
    if (options.channels_last or options.compile) and method == "pgd":
        return []  # PGD's only network is the classifier, which runs as given
    req = ExplainRequest(inputs=[str(IMAGES_DIR)], method=method, target="auto", classifier="demo:digits",
                         out=str(out), limit=limit, overwrite=True, seed=0,
                         options=options)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        run_explain(req, progress_stream=log)
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def images(folder: Path, records: list[dict]) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(Image.open(folder / r["counterfactual"]), dtype=np.float64) / 255
            for r in records if r.get("counterfactual")}


def gate_spread() -> str:
    """The demo CNN's input gradient under autocast against fp32, elementwise (max |Δ| / max |fp32|) and in norm
    (‖Δ‖ / ‖fp32‖), on random inputs of 3 seeds × batch 1, 2, 4: why the gate compares gradients in norm."""
    import torch

    from cfx_cli.backends.grad import FP32, GradPrecision
    from cfx_cli.backends.onnx_backend import parity_inputs
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    clf = load_classifier("demo:digits", ClassifierOptions())

    def grad(prec, x):
        xi = x.clone().requires_grad_(True)
        with torch.enable_grad(), prec.autocast():
            out = clf.logits(xi).float()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4321))
        return prec.grad((out * weights).sum(), [xi])[0].float()

    lines = ["| precision | batch | seed | gradient, elementwise | gradient, in norm |", "|---|---|---|---|---|"]
    for precision in ("bf16", "fp16"):
        for batch in (1, 2, 4):
            for seed in (1234, 1, 2):
                x = parity_inputs((torch.zeros(1, 3, 16, 16),), batch=batch, seed=seed)[0]
                ref, got = grad(FP32, x), grad(GradPrecision(precision), x)
                elementwise = float((got - ref).abs().max() / ref.abs().max())
                norm = float((got - ref).norm() / ref.norm())
                lines.append(f"| {precision} | {batch} | {seed} | {elementwise:.3g} | {norm:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--gate-spread", action="store_true",
                    help="only print the demo CNN's gradient error under autocast, elementwise and in norm")
    args = ap.parse_args(argv)
    if args.gate_spread:
        print(gate_spread())
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            ref_records, ref_images, ref_seconds = None, None, None
            for variant in args.variants.split(","):
                folder = Path(tmp) / f"{method}-{variant}"
                records = run(method, variant, folder, args.limit)
                if not records:
                    rows.append({"method": method, "variant": variant, "status": "n/a"})
                    continue
                seconds = statistics.median(r["seconds"] for r in records)
                row = {"method": method, "variant": variant, "status": "ok", "images": len(records),
                       "flipped": sum(r["status"] == "flipped" for r in records), "seconds": round(seconds, 4),
                       "ran": {k: records[0]["params"][k] for k in ("gradients", "backend")
                               if k in records[0]["params"]}}
                if variant == "fp32":
                    ref_records, ref_images, ref_seconds = records, images(folder, records), seconds
                elif ref_images is not None:
                    got = images(folder, records)
                    common = sorted(set(got) & set(ref_images))
                    diffs = [np.abs(got[k] - ref_images[k]) for k in common]
                    labels = {r["id"]: r.get("cf_label") for r in ref_records}
                    row.update(vs_fp32=round(ref_seconds / seconds, 3) if seconds else None,
                               max_abs_diff=round(float(max(d.max() for d in diffs)), 4),
                               mean_abs_diff=round(float(np.mean([d.mean() for d in diffs])), 5),
                               same_label=sum(r.get("cf_label") == labels.get(r["id"]) for r in records))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    lines = ["| method | variant | flipped | s / expl. | vs fp32 | max / mean \\|Δ\\| vs fp32 | same label | ran |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['variant']} | {r['status']} | | | | | |")
            continue
        diff = f"{r['max_abs_diff']:.3g} / {r['mean_abs_diff']:.2g}" if "max_abs_diff" in r else ""
        ratio = f"{r['vs_fp32']:.2f}×" if r.get("vs_fp32") else ""
        same = f"{r['same_label']}/{r['images']}" if "same_label" in r else ""
        ran = "; ".join(f"{k}: {v}" for k, v in r["ran"].items())
        lines.append(f"| {r['method']} | {r['variant']} | {r['flipped']}/{r['images']} | {r['seconds']:.3g} | "
                     f"{ratio} | {diff} | {same} | {ran} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
