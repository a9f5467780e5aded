"""User-given region masks (``--mask FILE|DIR``): where an explainer may change the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfx_cli.errors import InputError, UsageError
from cfx_cli.images import EXTENSIONS, InputImage


class MaskSource:
    """A single mask for every input, or a folder matched by input id or file stem."""

    def __init__(self, spec: str) -> None:
        self.path = Path(spec)
        if not self.path.exists():
            raise UsageError(f"--mask {spec}: no such file or folder")
        self._index: dict[str, Path] = {}
        if self.path.is_dir():
            for p in sorted(self.path.rglob("*")):
                if p.suffix.lower() in EXTENSIONS:
                    self._index.setdefault(p.stem, p)

    def mask_for(self, item: InputImage, size: tuple[int, int]) -> np.ndarray:
        """Binary float32 (H, W) mask, 1 = may change; any image mode, thresholded at 0.5."""
        from PIL import Image

        from cfx_cli.images import decode

        if self.path.is_dir():
            p = self._index.get(item.id) or self._index.get(item.path.stem)
            if p is None:
                raise InputError(f"{item.path}: no mask named {item.id}.png or {item.path.stem}.png in {self.path}")
        else:
            p = self.path
        gray = decode(p).mean(axis=2)
        h, w = size
        img = Image.fromarray((gray * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        return (np.asarray(img, dtype=np.float32) >= 127.5).astype(np.float32)
