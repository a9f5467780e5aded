"""``--region FILE|DIR`` (alias ``--mask``): one mask image for every input, or a folder of masks matched by input
id or file stem. Any image mode; thresholded at 0.5 and brought (nearest) to the input's working size as the input is
(short-side resize + centre crop): give masks at the input file's size or at the working size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cfx_cli.errors import InputError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.images import EXTENSIONS, InputImage, decode, fit_to_size
from cfx_cli.regions import RegionSource


class MaskSource(RegionSource):
    """A single mask for every input, or a folder matched by input id or file stem."""

    scheme = "file"
    summary = "a mask image, or a folder of masks named after the inputs"
    handles_paths = True

    def __init__(self, spec: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(spec, options)
        self.spec = spec
        self.path = Path(spec)
        if not self.path.exists():
            raise UsageError(f"--region {spec}: no such file or folder")
        self._index: dict[str, Path] = {}
        if self.path.is_dir():
            for p in sorted(self.path.rglob("*")):
                if p.suffix.lower() in EXTENSIONS:
                    self._index.setdefault(p.stem, p)

    def mask_for(self, item: InputImage, size: tuple[int, int], image=None, classifier=None) -> np.ndarray:
        """Binary float32 (H, W) mask, 1 = may change; any image mode, thresholded at 0.5."""
        if self.path.is_dir():
            p = self._index.get(item.id) or self._index.get(item.path.stem)
            if p is None:
                raise InputError(f"{item.path}: no mask named {item.id}.png or {item.path.stem}.png in {self.path}")
        else:
            p = self.path
        levels = (decode(p).mean(axis=2, keepdims=True) * 255).astype(np.uint8).astype(np.float32)
        fitted = fit_to_size(levels / 255.0, size, nearest=True)[..., 0] * 255.0
        return (fitted >= 127.5).astype(np.float32)


@hookimpl
def register_region_sources(register):
    register(MaskSource)
