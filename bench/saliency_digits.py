"""ScoreCAM / Grad-CAM on the 16 demo images of demo:digits: faithfulness (deletion), key-region size, time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/saliency_digits.py [--runs 5] [--xi 0.5]

Per map (layer, method): the mean drop of the predicted class's probability when the 30% highest-map pixels
are set to the background (0), next to the same for 30% random pixels (20 draws); the number of images whose
map is zero everywhere; the mean key-region area M = [U > ξ]; and min / median wall seconds for the 16
images (interleaved runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cfx_cli import saliency
from cfx_cli.demo import IMAGES_DIR
from cfx_cli.demo.classifier import load_pretrained
from cfx_cli.images import decode, discover

CASES = [  # (label, function, layer, keyword arguments)
    ("scorecam features.6 (default)", saliency.score_cam, "features.6", {}),
    ("scorecam features.6 −p(black)", saliency.score_cam, "features.6", {"subtract_baseline": True}),
    ("scorecam features.5 (raw conv)", saliency.score_cam, "features.5", {}),
    ("scorecam features.3", saliency.score_cam, "features.3", {}),
    ("gradcam  features.6 (default)", saliency.grad_cam, "features.6", {}),
    ("gradcam  features.7 (pooled)", saliency.grad_cam, "features.7", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--xi", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_pretrained()
    x = torch.from_numpy(np.stack([decode(i.path) for i in discover([str(IMAGES_DIR)])])).permute(0, 3, 1, 2)
    x = x.float().contiguous()
    n, pixels = x.shape[0], x.shape[2] * x.shape[3]
    rows = torch.arange(n)
    with torch.no_grad():
        before = torch.softmax(model(x), 1)
    pred = before.argmax(1)
    k = int(0.3 * pixels)

    def drop(idx: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(n, pixels)
        keep.scatter_(1, idx, 0.0)
        with torch.no_grad():
            after = torch.softmax(model(x * keep.view(n, 1, *x.shape[2:])), 1)
        return before[rows, pred] - after[rows, pred]

    g = torch.Generator().manual_seed(0)
    rand = torch.stack([drop(torch.stack([torch.randperm(pixels, generator=g)[:k] for _ in range(n)]))
                        for _ in range(20)]).mean(0)
    times: dict[str, list[float]] = {c[0]: [] for c in CASES}
    maps: dict[str, torch.Tensor] = {}
    for _ in range(args.runs):
        for label, fn, layer, kw in CASES:  # interleaved, so machine noise hits every case alike
            t0 = time.perf_counter()
            maps[label] = fn(model, layer, x, pred, **kw)
            times[label].append(time.perf_counter() - t0)
    print(f"demo:digits, {n} images, predicted class, ξ = {args.xi}, top/random 30% of pixels set to 0, "
          f"{args.runs} runs, torch threads {torch.get_num_threads()}")
    print(f"{'map':32s} {'drop top30%':>11s} {'drop rand30%':>12s} {'zero maps':>9s} {'area M':>7s} "
          f"{'min s':>7s} {'median s':>8s}")
    for label, *_ in CASES:
        m = maps[label]
        d = drop(m.reshape(n, -1).topk(k, dim=1).indices)
        zero = int((m.reshape(n, -1).amax(1) == 0).sum())
        area = float(saliency.key_region(m, args.xi).mean())
        ts = times[label]
        print(f"{label:32s} {float(d.mean()):11.3f} {float(rand.mean()):12.3f} {zero:9d} {area:7.3f} "
              f"{min(ts):7.3f} {statistics.median(ts):8.3f}")


if __name__ == "__main__":
    main()
