"""scikit-learn's bundled digits as the demo's dataset (needs the ``train``/``dev`` extra).

8×8 images with values 0–16 are upsampled bilinearly to 16×16, replicated to 3 channels and
scaled to [0, 1] (ink bright on a dark background). Split: 75/25 stratified, seed 0 — the same
split for every demo model, so "held-out" means the same images everywhere.

The demo protocol (docs/demo-protocol.md) divides the held-out digits further, by the indices in ``splits.json``:
``readme`` (the 16 images of ``images/``), ``tuning`` (178, for choosing presets) and ``test`` (256, for the
reported numbers; never tuned on).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cfx_cli.demo import DEMO_DIR, RESOLUTION

SPLITS_FILE = DEMO_DIR / "splits.json"
PROTOCOL_SPLITS = ("tuning", "test", "readme")


def load_split(resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x float32 (N, 3, R, R) in [0, 1], y int64."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from cfx_cli.images import resize_images  # numpy at its top: lazy like torch

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)

    def up(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(a)[:, None]
        t = resize_images(t, (resolution, resolution), antialias=False)
        return t.clamp(0, 1).repeat(1, 3, 1, 1).numpy()

    return up(x_tr), y_tr, up(x_te), y_te


def split_indices(name: str) -> list[int]:
    """The held-out indices of a protocol split (``tuning``, ``test`` or ``readme``), in the committed order."""
    if name not in PROTOCOL_SPLITS:
        raise ValueError(f"unknown demo split {name!r} (expected {', '.join(PROTOCOL_SPLITS)})")
    return list(json.loads(SPLITS_FILE.read_text(encoding="utf-8"))[name])


def load_protocol_split(name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(x, y, held-out indices) of the first ``limit`` digits of a protocol split (all when None)."""
    idx = split_indices(name)[:limit]
    _, _, x_te, y_te = load_split()
    return x_te[idx], y_te[idx], idx


def export_split(split: str, out: Path, limit: int | None = None) -> list[Path]:
    """Write the first ``limit`` digits of ``split`` (``train``, ``held-out`` or a protocol split) into ``out`` as
    ``SPLIT-INDEX-labelK.png``, INDEX the digit's index in its half of :func:`load_split`; returns the files."""
    from cfx_cli.images import save_png  # numpy at its top: lazy like torch

    if split in PROTOCOL_SPLITS:
        x, y, idx = load_protocol_split(split, limit)
    elif split in ("train", "held-out"):
        x_tr, y_tr, x_te, y_te = load_split()
        x, y = (x_tr[:limit], y_tr[:limit]) if split == "train" else (x_te[:limit], y_te[:limit])
        idx = list(range(len(x)))
    else:
        raise ValueError(f"unknown demo split {split!r}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img, label in zip(idx, x, y, strict=True):
        paths.append(out / f"{split}-{i:04d}-label{int(label)}.png")
        save_png(img.transpose(1, 2, 0), paths[-1])
    return paths
