"""scikit-learn's bundled digits as the demo's dataset (needs the ``train``/``dev`` extra).

8×8 images with values 0–16 are upsampled bilinearly to 16×16, replicated to 3 channels and
scaled to [0, 1] (ink bright on a dark background). Split: 75/25 stratified, seed 0 — the same
split for every demo model, so "held-out" means the same images everywhere.
"""

from __future__ import annotations

import numpy as np

from cfx_cli.demo import RESOLUTION


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
