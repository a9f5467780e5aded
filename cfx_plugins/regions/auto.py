"""``--region auto``: Integrated-Gradients regions of the predicted class, grouped into grid cells (RCSB §3).

Integrated Gradients of the predicted class in a noise tunnel, |attribution| summed over channels, clipped at a
percentile, summed into c×c grid cells, cells kept from the highest down until they cover a fraction ``a`` of
the image area (the maths: :mod:`cfx_cli.attribution`). Options come from ``--set region_area=0.3
--set region_cell=4 ...`` (:data:`AUTO_OPTIONS`). Needs a white-box classifier.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from cfx_cli.attribution import IG_NOISE, IG_SAMPLES, IG_STEPS, cells_covering, integrated_gradients
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.images import InputImage
from cfx_cli.regions import RegionSource

#: ``--set`` keys consumed by the automatic region source (not passed to the explainer), with defaults
AUTO_OPTIONS: dict[str, Any] = {
    "region_area": 0.3,  # a: fraction of the image area to cover (RCSB code README: 0.3)
    "region_cell": 4,  # c: grid cell size in pixels (paper table: 4; code README: 16 at 256×256)
    "region_steps": IG_STEPS,  # IG Riemann steps
    "region_noise": IG_NOISE,  # noise tunnel σ (code: 0.05)
    "region_samples": IG_SAMPLES,  # noise tunnel samples
    "region_clip": 98.0,  # percentile clipping of |attr| (code: 98)
}


class AutoRegion(RegionSource):
    """Integrated-Gradients regions of the predicted class, grouped into grid cells (RCSB §3)."""

    scheme = "auto"
    summary = "Integrated Gradients of the predicted class, c×c cells covering a fraction a of the area"
    needs_classifier = True
    option_defaults = AUTO_OPTIONS
    takes_arg = False

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None) -> None:
        opts = {**AUTO_OPTIONS, **(options or {})}
        super().__init__(arg, opts)
        self.spec = "auto"
        try:
            self.area = float(opts["region_area"])
            self.cell = int(opts["region_cell"])
            self.steps = int(opts["region_steps"])
            self.noise = float(opts["region_noise"])
            self.samples = int(opts["region_samples"])
            self.clip = float(opts["region_clip"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--region auto: bad region option ({exc})") from None
        if not 0 < self.area <= 1:
            raise UsageError(f"--set region_area={self.area}: must be in (0, 1]")
        if self.cell < 1 or self.steps < 1 or self.samples < 1:
            raise UsageError("--set region_cell/region_steps/region_samples: must be at least 1")
        if not 0 < self.clip <= 100:
            raise UsageError(f"--set region_clip={self.clip}: a percentile in (0, 100]")
        self.options = {"region_area": self.area, "region_cell": self.cell, "region_steps": self.steps,
                        "region_noise": self.noise, "region_samples": self.samples, "region_clip": self.clip}

    def mask_for(self, item: InputImage, size: tuple[int, int], image=None, classifier=None) -> np.ndarray:
        import torch

        if image is None or classifier is None:
            raise UsageError("--region auto needs the image and a white-box classifier")
        if "gradients" not in classifier.capabilities:
            raise UsageError(f"--region auto: classifier {classifier.spec} gives no gradients (Integrated "
                             "Gradients needs a white-box classifier); pass --region FILE|DIR instead")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        attr = integrated_gradients(classifier, x, steps=self.steps, noise=self.noise, samples=self.samples,
                                    seed=zlib.crc32(item.id.encode("utf-8")))
        heat = attr.abs().sum(dim=1)[0].numpy()
        return cells_covering(heat, self.area, self.cell, self.clip)


@hookimpl
def register_region_sources(register):
    register(AutoRegion)
