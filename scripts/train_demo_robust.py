"""Train ``demo:digits-robust``: the demo CNN's architecture, adversarially trained, for robust-classifier guidance.

    python scripts/train_demo_robust.py [--out DIR]

The guide of DVCE-style guidance (Augustin et al. 2022, ``--set guide=demo:digits-robust``;
``cfx_cli/guide.py``): an adversarially robust classifier has gradients that look like the digits (perceptually
aligned), where the plain demo CNN's gradients are mostly adversarial. It is :class:`cfx_cli.demo.classifier.DigitsCNN`
trained on the 1347 training digits (no held-out digit is seen) with Madry et al.'s adversarial training against its
OWN ℓ2 PGD (radius ``EPS`` in [0, 1] pixel units over the 3×16×16 input, ``ADV_STEPS`` steps; never the explained
CNN's gradients, never the judges'), ±1-pixel shifts, AdamW with a cosine schedule, checkpoints every 100 steps under
``build/demo-train/robust-…/`` (a killed run resumes). ``CFX_ROBUST_EPS`` overrides the radius for a sweep.
Writes ``cfx_cli/demo/digits_robust.safetensors`` and ``digits_robust.json`` (accuracy per protocol split, clean
and under its own attack, seconds). About 4 minutes on one CPU thread of a loaded machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _demo_training import (
    optimizer_step,
    random_shift,
    save_weights,
    setup_torch,
    split_accuracies,
    step_generator,
    train_loop,
)

from cfx_cli.demo import DEMO_DIR
from cfx_cli.demo.classifier import ROBUST_WEIGHTS, DigitsCNN
from cfx_cli.demo.data import load_split

SEED = 404
STEPS = 1500
BATCH = 64
LR = 2e-3
WEIGHT_DECAY = 1e-4
EPS = float(os.environ.get("CFX_ROBUST_EPS", 1.0))  # ℓ2 radius in [0, 1] pixel units (768 values)
ADV_STEPS = 5


def l2_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """x + δ, ‖δ‖₂ ≤ eps per image, from δ = 0 by normalised-gradient ascent on the model's own cross-entropy."""
    delta = torch.zeros_like(x)
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + step * grad / norm
        scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
        delta = delta * scale
    return (x + delta).clamp(0, 1).detach()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, eps: float = 0.0) -> float:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if eps:
        xt = l2_pgd(model, xt, yt, eps, 10)
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help="where the weights go (candidates: not the package)")
    args = ap.parse_args()
    setup_torch(SEED)
    x_tr, y_tr, _, _ = load_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step_fn(step: int) -> float:
        g = step_generator(SEED, step)
        idx = torch.randint(0, len(xt), (BATCH,), generator=g)
        x, y = random_shift(xt[idx], g), yt[idx]
        model.eval()  # the attack sees the deterministic network (no dropout)
        x_adv = l2_pgd(model, x, y, EPS, ADV_STEPS)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer_step(opt, loss, LR * 0.5 * (1 + math.cos(math.pi * step / STEPS)))
        return float(loss.detach())

    t0 = time.time()
    losses = train_loop(f"robust-l2-{EPS:g}x{ADV_STEPS}", STEPS, step_fn, model, None, opt, log_every=250)
    model.eval()
    path = args.out / ROBUST_WEIGHTS
    save_weights(model, path)
    clean = split_accuracies(lambda x, y: accuracy(model, x, y), x_tr, y_tr)
    attacked = split_accuracies(lambda x, y: accuracy(model, x, y, EPS), x_tr, y_tr)
    acc = {"train": clean["train"]}
    for split in ("tuning", "test", "readme"):
        acc[split], acc[f"{split}_under_own_l2_pgd"] = clean[split], attacked[split]
    meta = {"architecture": "DigitsCNN", "seed": SEED, "steps": STEPS, "batch": BATCH, "lr": LR,
            "adversarial": {"norm": "l2", "eps": EPS, "steps": ADV_STEPS, "attack": "own ℓ2 PGD"},
            "final_loss": round(float(np.mean(losses[-50:])), 4), "accuracy": acc,
            "seconds": round(time.time() - t0, 1), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (path.with_suffix(".json")).write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
