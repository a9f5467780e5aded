"""Train the embedded demo classifier (seeded, ~1 minute on 2 CPU cores) and write its weights,
model card and the bundled demo images.

    python scripts/train_demo_classifier.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfx_cli.demo import DEMO_DIR, IMAGES_DIR, LABELS, RESOLUTION  # noqa: E402
from cfx_cli.demo.classifier import WEIGHTS, DigitsCNN  # noqa: E402
from cfx_cli.demo.data import load_split  # noqa: E402
from cfx_cli.images import save_png  # noqa: E402

SEED = 0
EPOCHS = 30
BATCH = 64
N_DEMO_IMAGES = 16


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # random shifts of up to 1 pixel keep the CNN from memorising exact positions
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=g)
    dy = torch.randint(0, 3, (n,), generator=g)
    out = torch.stack([pad[i, :, dy[i]:dy[i] + RESOLUTION, dx[i]:dx[i] + RESOLUTION] for i in range(n)])
    return out


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(SEED)
    x_tr, y_tr, x_te, y_te = load_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(augment(xt[idx], g)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
        print(f"epoch {epoch + 1:2d} loss {total / len(xt):.4f} held-out acc {acc:.4f}", flush=True)

    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(DEMO_DIR / WEIGHTS))
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(1).numpy()
    acc = float((pred == y_te).mean())
    meta = {
        "labels": LABELS, "input_size": [RESOLUTION, RESOLUTION], "held_out_accuracy": round(acc, 4),
        "held_out_images": int(len(y_te)), "train_images": int(len(y_tr)), "seed": SEED, "epochs": EPOCHS,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (DEMO_DIR / "digits_classifier.json").write_text(json.dumps(meta, indent=2) + "\n")

    # the bundled demo folder: the first held-out images, cycling through the digits
    IMAGES_DIR.mkdir(exist_ok=True)
    for old in IMAGES_DIR.glob("*.png"):
        old.unlink()
    rng = np.random.default_rng(SEED)
    chosen = []
    for k in range(N_DEMO_IMAGES):
        candidates = np.flatnonzero((y_te == k % 10) & (pred == y_te))
        chosen.append(int(rng.choice(candidates[~np.isin(candidates, chosen)])))
    for n, i in enumerate(chosen):
        save_png(x_te[i].transpose(1, 2, 0), IMAGES_DIR / f"digit-{n:02d}-label{y_te[i]}.png")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
