"""Train ``demo:hit-digits``, a small HiT (thesis ch. 6) on the demo digits, seeded and resumable.

    python scripts/train_demo_hit.py        # resumes from build/demo-train/hit/ if killed

The spatial HiT of the authors' hit-s/hit-b configs, scaled down: 16×16 inputs, 2×2-pixel patches (an 8×8 grid,
pooled to 4×4 and 2×2), 3 stages of 2 layers, width 32, 4 heads. Trained on the train split of
``cfx_cli.demo.data.load_split`` (the held-out 450 images are never seen) with the thesis' recipe scaled down:
AdamW, weight decay 0.05, label smoothing 0.1, attention dropout 0.1, linear warm-up then cosine decay, plus
±1-pixel random shifts as for ``demo:digits``. Writes cfx_cli/demo/models/hit/ (weights in safetensors, config.json
in the authors' format, metrics.json, loss_curve.png, README.md). Checkpoints go to build/demo-train/hit/ every
100 steps.
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from _demo_training import loss_curve_png, setup_torch, step_generator, train_loop
from safetensors.torch import save_file

from cfx_cli.demo import LABELS, RESOLUTION
from cfx_cli.demo.data import load_split
from cfx_plugins.classifiers.hit import DEMO_CONFIG, DEMO_DIR, DEMO_WEIGHTS
from cfx_plugins.classifiers.hit.model import HiT, HiTConfig

SEED = 0
EPOCHS = 60
BATCH = 64
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.05
SMOOTHING = 0.1
MEAN = STD = (0.5, 0.5, 0.5)  # inputs (x − 0.5)/0.5, as demo:digits
CONFIG = HiTConfig(image_size=RESOLUTION, patch_size=2, num_heads=4, mlp_ratio=2, num_classes=len(LABELS),
                   blocks=(2, 2, 2), block_dims=(32, 32, 32), attention_dropout=0.1)


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (zero padding), per image."""
    n, _, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def main() -> None:
    setup_torch(SEED)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te = load_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    per_epoch = math.ceil(len(xt) / BATCH)
    total = EPOCHS * per_epoch
    model = HiT(CONFIG)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR)

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        return 0.5 * LR * (1 + math.cos(math.pi * (step - WARMUP) / (total - WARMUP)))

    def step_fn(step: int) -> float:
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(xt), generator=step_generator(SEED, epoch))  # same batches after a resume
        idx = perm[i * BATCH:(i + 1) * BATCH]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        model.train()
        x = shift(xt[idx], step_generator(SEED + 1, step))
        loss = F.cross_entropy(model(normalise(x)), yt[idx], label_smoothing=SMOOTHING)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    t0 = time.time()
    losses = train_loop("hit", total, step_fn, model, None, opt, ckpt_every=100, log_every=per_epoch)
    seconds = time.time() - t0
    model.eval()
    with torch.no_grad():
        pred = model(normalise(torch.from_numpy(x_te))).argmax(1).numpy()
        d = model.decompose(normalise(torch.from_numpy(x_te[:64])))
        gap = float((d.patch_map().sum((2, 3)) + d.bias - d.logits).abs().max())
    acc = float((pred == y_te).mean())
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(DEMO_DIR / DEMO_WEIGHTS))
    config = {"model": CONFIG.to_authors(), "labels": LABELS, "mean": list(MEAN), "std": list(STD)}
    (DEMO_DIR / DEMO_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    metrics = {
        "held_out_accuracy": round(acc, 4), "held_out_correct": int((pred == y_te).sum()),
        "held_out_images": int(len(y_te)), "train_images": int(len(y_tr)), "seed": SEED, "epochs": EPOCHS,
        "steps": total, "batch": BATCH, "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss_last_epoch_mean": float(sum(losses[-per_epoch:]) / per_epoch),
        "train_seconds_this_run": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "decomposition_max_abs_gap": gap,
    }
    (DEMO_DIR / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    loss_curve_png(losses, DEMO_DIR / "loss_curve.png", "demo:hit-digits training loss", window=per_epoch)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
