"""Insertion/deletion nAUC of saliency maps on demo:hit-digits, the thesis' Table 6.2 setting on the demo digits.

    OMP_NUM_THREADS=1 .venv/bin/python bench/hit_saliency.py [--offset 0] [--images 200] [--steps 196]

Held-out demo digits (``cfx_cli.demo.data.load_split``: ``--images`` of the 450 from ``--offset``), each explained
for its predicted class by: HiT's own map (the exact per-patch decomposition), the adapted rollout (CLS attention
averaged over heads and layers), Grad-CAM and ScoreCAM at the authors' Grad-CAM layer (the last layer's ``ln_1``,
the 2×2 token grid, upsampled bilinearly), Grad-CAM one stage earlier (4×4 grid), Integrated Gradients as
``--region auto`` computes it (noise tunnel, |attribution| summed over channels, 16×16) and a random map (seed
0). Each gets the authors' insertion/deletion curves (zero and blur corruption, 196 steps) and the thesis' nAUC
(:mod:`cfx_plugins.metrics.insertion_deletion`). Prints a Markdown table and the wall time of each row.
"""

from __future__ import annotations

import argparse
import time

import torch

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.demo.data import load_split
from cfx_plugins.metrics.insertion_deletion import DEFAULT_STEPS, evaluate_maps, saliency_maps

LAST = "model.encoder.layers.block_2.encoder_layer_1.ln_1"  # the authors' layers[2][-1].ln_1
MIDDLE = "model.encoder.layers.block_1.encoder_layer_1.ln_1"
MAPS = [  # (row label, map source for saliency_maps, or "random")
    ("HiT (exact decomposition)", "hit"),
    ("rollout (mean attention)", "rollout"),
    ("Grad-CAM, last layer (2×2)", f"gradcam:{LAST}"),
    ("Grad-CAM, stage 2 (4×4)", f"gradcam:{MIDDLE}"),
    ("ScoreCAM, last layer (2×2)", f"scorecam:{LAST}"),
    ("Integrated Gradients (16×16)", "ig"),
    ("random (8×8)", "random"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args()
    torch.manual_seed(0)
    clf = load_classifier("demo:hit-digits", ClassifierOptions())
    _, _, x_te, y_te = load_split()
    chosen = slice(args.offset, args.offset + args.images)
    x = torch.from_numpy(x_te[chosen])
    pred = clf.predict_proba(x).argmax(1)
    acc = float((pred.numpy() == y_te[chosen]).mean())
    print(f"demo:hit-digits, held-out digits {args.offset}–{args.offset + len(x) - 1} (accuracy {100 * acc:.2f}%), "
          f"predicted class, {args.steps} steps, torch threads {torch.get_num_threads()}\n")
    print("| map | ins zero ↑ | ins blur ↑ | del zero ↓ | del blur ↓ | map s | metric s |")
    print("|---|---|---|---|---|---|---|")
    for label, source in MAPS:
        t0 = time.perf_counter()
        if source == "random":
            maps = torch.rand(len(x), 8, 8, generator=torch.Generator().manual_seed(0))
        else:
            maps = saliency_maps(clf, x, source).detach()
        t1 = time.perf_counter()
        r = evaluate_maps(clf, x, maps, classes=pred, steps=args.steps)
        t2 = time.perf_counter()
        print(f"| {label} | {r['ins_zero']:.3f} | {r['ins_blur']:.3f} | {r['del_zero']:.3f} | {r['del_blur']:.3f} "
              f"| {t1 - t0:.1f} | {t2 - t1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
