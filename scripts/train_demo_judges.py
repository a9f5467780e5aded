"""Train the demo's metric networks (``cfx_cli/demo/judges.py``) on the demo training split.

    python scripts/train_demo_judges.py [--only oracle-mlp,oracle-rff,features]

Each network trains from its own seed on the 1347 training digits of ``cfx_cli.demo.data.load_split`` (the split
every demo model trains on; no held-out digit is seen), with ±1-pixel random shifts and Gaussian pixel noise
(σ ~ U(0, 0.3) per image), AdamW and a cosine schedule, and checkpoints every 100 steps under
``build/demo-train/judge-NAME…/`` (a killed run resumes). The two oracles are adversarially trained against their
own ℓ∞ PGD (radius 0.1 for the MLP, 0.05 for the RFF, 5 steps; ``CFX_JUDGE_EPS_MLP`` / ``CFX_JUDGE_EPS_RFF`` /
``CFX_JUDGE_ADV_STEPS`` override them for a sweep, ``--out DIR`` writes candidates elsewhere). It writes
``cfx_cli/demo/judges/NAME.safetensors`` and ``judges.json`` (accuracy per protocol split, parameters, seconds).
About 2 min (MLP), 3 min (RFF) and 6 min (ResNet) on one CPU thread of a loaded machine.
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

from cfx_cli.demo.data import load_split
from cfx_cli.demo.judges import ARCHITECTURES, JUDGES_DIR, grey, weights_path

SEEDS = {"oracle-mlp": 101, "oracle-rff": 202, "features": 303}
STEPS = {"oracle-mlp": 1500, "oracle-rff": 4000, "features": 1000}
LR = {"oracle-mlp": 1e-3, "oracle-rff": 2e-2, "features": 2e-3}
BATCH = 64
NOISE = 0.3  # Gaussian pixel noise of a per-image σ ~ U(0, NOISE): judges that read the shape, not the noise
WEIGHT_DECAY = 1e-4
# Adversarial training against the judge's OWN gradients (Madry et al. 2018): each batch also holds the worst
# ℓ∞ perturbation of radius ADV_EPS that ADV_STEPS signed-gradient steps on the judge's cross-entropy find. Never
# the explained CNN's gradients: the judge learns that no small pixel pattern makes a digit, not one attack.
ADV_EPS = {"oracle-mlp": float(os.environ.get("CFX_JUDGE_EPS_MLP", 0.1)),
           "oracle-rff": float(os.environ.get("CFX_JUDGE_EPS_RFF", 0.05)), "features": 0.0}
ADV_STEPS = int(os.environ.get("CFX_JUDGE_ADV_STEPS", 5))


def init_rff(model: torch.nn.Module, x_train: torch.Tensor, g: torch.Generator) -> float:
    """Fixed random features for the RBF kernel exp(−‖x − y‖² / 2γ²), γ the median pairwise distance."""
    flat = grey(x_train).flatten(1)
    sub = flat[torch.randperm(len(flat), generator=g)[:500]]
    gamma = float(torch.cdist(sub, sub)[torch.triu_indices(len(sub), len(sub), 1).unbind()].median())
    d = model.phase.numel()
    model.projection.copy_(torch.randn(flat.shape[1], d, generator=g) / gamma)
    model.phase.copy_(torch.rand(d, generator=g) * 2 * math.pi)
    return gamma


def own_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, g: torch.Generator) -> torch.Tensor:
    """x + δ, ‖δ‖∞ ≤ eps, one δ for all channels (the judges read the channel mean), that raises the judge's loss."""
    delta = (torch.rand(x[:, :1].shape, generator=g) * 2 - 1) * eps
    step = 2.5 * eps / ADV_STEPS
    for _ in range(ADV_STEPS):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def train(name: str, x_tr: np.ndarray, y_tr: np.ndarray, out: Path) -> dict:
    seed, total, eps = SEEDS[name], STEPS[name], ADV_EPS[name]
    setup_torch(seed)
    model = ARCHITECTURES[name]()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    extra = {}
    if name == "oracle-rff":
        with torch.no_grad():
            extra["gamma"] = round(init_rff(model, xt, torch.Generator().manual_seed(seed)), 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[name],
                            weight_decay=WEIGHT_DECAY)

    def step_fn(step: int) -> float:
        g = step_generator(seed, step)
        idx = torch.randint(0, len(xt), (BATCH,), generator=g)
        x = random_shift(xt[idx], g)
        sigma = torch.rand(len(x), 1, 1, 1, generator=g) * NOISE
        x = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        y = yt[idx]
        loss = F.cross_entropy(model(x), y)
        if eps:  # half clean, half adversarial: robust without giving up clean accuracy
            loss = 0.5 * loss + 0.5 * F.cross_entropy(model(own_pgd(model, x, y, eps, g)), y)
        lr = LR[name] * 0.5 * (1 + math.cos(math.pi * step / total))
        optimizer_step(opt, loss, lr)
        return float(loss.detach())

    t0 = time.time()
    model.train()
    ckpt = f"judge-{name}" + (f"-adv{eps:g}x{ADV_STEPS}" if eps else "")  # a changed recipe does not resume
    losses = train_loop(ckpt, total, step_fn, model, None, opt, log_every=250)
    model.eval()
    path = out / weights_path(name).name
    save_weights(model, path)
    acc = split_accuracies(lambda x, y: accuracy(model, x, y), x_tr, y_tr)
    return {"architecture": ARCHITECTURES[name].__name__, "seed": seed, "steps": total, "batch": BATCH, "noise": NOISE,
            "adversarial": {"eps": eps, "steps": ADV_STEPS, "attack": "own ℓ∞ PGD"} if eps else None,
            "lr": LR[name], "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": round(float(np.mean(losses[-50:])), 4), "accuracy": acc,
            "seconds": round(time.time() - t0, 1), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(ARCHITECTURES))
    ap.add_argument("--out", type=Path, default=JUDGES_DIR, help="where the weights go (candidates: not the package)")
    args = ap.parse_args()
    x_tr, y_tr, _, _ = load_split()
    meta_path = args.out / "judges.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        meta[name] = train(name, x_tr, y_tr, args.out)
        print(name, json.dumps(meta[name]), flush=True)
        meta_path.write_text(json.dumps(dict(sorted(meta.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
