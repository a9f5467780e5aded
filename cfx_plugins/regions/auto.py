"""``--region auto``: Integrated-Gradients regions of the predicted class, grouped into grid cells (RCSB §3).

By default the authors' rule (RCSB's ``IntegratedGradients`` explainer + ``postprocess_attr_maps``): IG of the
predicted class (zero baseline, 50 Gauss–Legendre steps) in a SmoothGrad noise tunnel (5 samples, σ 0.05),
|Σ_c attr| divided by its 98 % cumulative-mass value and clipped to [0, 1], summed into c×c cells, and the cells
kept by the 200-level quantile scan that covers at most a fraction ``a`` of the cells. ``region_rule=cfx`` is
cfx's earlier rule (Σ_c |attr|, percentile clip, cells added until ≥ a). The maths: :mod:`cfx_cli.attribution`.
Options come from ``--set region_area=0.3 --set region_cell=4 ...`` (:data:`AUTO_OPTIONS`). Needs a white-box
classifier.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cfx_cli.attribution import (
    IG_NOISE,
    IG_SAMPLES,
    IG_STEPS,
    RegionTrace,
    cells_covering,
    integrated_gradients,
    rcsb_region,
    tunnel_draws,
)
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.images import InputImage
from cfx_cli.regions import RegionSource

#: the rules ``--set region_rule=`` selects: the authors' (default) and cfx's earlier one
REGION_RULES = ("rcsb", "cfx")

#: ``--set`` keys consumed by the automatic region source (not passed to the explainer), with defaults
AUTO_OPTIONS: dict[str, Any] = {
    "region_area": 0.3,  # a: fraction of the cells to cover at most (RCSB code: 0.3)
    "region_cell": 4,  # c: grid cell size in pixels (paper table: 4; code: 16 at 256×256, a 16×16 grid)
    "region_steps": IG_STEPS,  # IG Gauss–Legendre steps (captum's default 50)
    "region_noise": IG_NOISE,  # noise tunnel σ (code: 0.05)
    "region_samples": IG_SAMPLES,  # noise tunnel samples (captum's default 5)
    "region_clip": 98.0,  # rcsb: cumulative-mass percentile of the heat normalisation; cfx: percentile clip
    "region_rule": "rcsb",  # rcsb: the authors' postprocessing; cfx: cfx's earlier rule
}


def id_seed(item_id: str) -> int:
    """The per-input seed of the noise tunnel: regions depend on the input alone, not on --seed or the batch."""
    return zlib.crc32(item_id.encode("utf-8"))


class AutoRegion(RegionSource):
    """Integrated-Gradients regions of the predicted class, grouped into grid cells (RCSB §3)."""

    scheme = "auto"
    summary = "Integrated Gradients of the predicted class, c×c cells covering a fraction a of the area"
    needs_classifier = True
    option_defaults = AUTO_OPTIONS
    takes_arg = False

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None, noise: Any = None) -> None:
        """``noise``: the :class:`cfx_cli.diffusion.noise.NoiseSource` of the noise tunnel (default: each input's
        generator seeded from its id); the e2e tests pass the reference draws."""
        opts = {**AUTO_OPTIONS, **(options or {})}
        super().__init__(arg, opts)
        self.spec = "auto"
        self.noise = noise
        try:
            self.area = float(opts["region_area"])
            self.cell = int(opts["region_cell"])
            self.steps = int(opts["region_steps"])
            self.sigma = float(opts["region_noise"])
            self.samples = int(opts["region_samples"])
            self.clip = float(opts["region_clip"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--region auto: bad region option ({exc})") from None
        self.rule = str(opts["region_rule"])
        if self.rule not in REGION_RULES:
            raise UsageError(f"--set region_rule={self.rule}: expected one of {', '.join(REGION_RULES)}")
        if not 0 < self.area <= 1:
            raise UsageError(f"--set region_area={self.area}: must be in (0, 1]")
        if self.cell < 1 or self.steps < 1 or self.samples < 1:
            raise UsageError("--set region_cell/region_steps/region_samples: must be at least 1")
        if not 0 < self.clip <= 100:
            raise UsageError(f"--set region_clip={self.clip}: a percentile in (0, 100]")
        self.options = {"region_area": self.area, "region_cell": self.cell, "region_steps": self.steps,
                        "region_noise": self.sigma, "region_samples": self.samples, "region_clip": self.clip,
                        "region_rule": self.rule}

    def extract(self, ids: Sequence[str], images, classifier) -> RegionTrace:
        """Every stage of the regions of (B, 3, H, W) ``images`` in [0, 1]; each image's only from its own draws."""
        import torch

        from cfx_cli.diffusion.noise import SeededNoise

        x = images.float()
        tunnel = None
        if self.samples > 1 and self.sigma > 0:
            source = self.noise if self.noise is not None else SeededNoise()
            draws = source.for_batch(list(ids), [id_seed(i) for i in ids], "cpu")
            tunnel = tunnel_draws(draws, len(ids), tuple(x.shape[1:]), self.samples, self.sigma)
        with torch.no_grad():
            target = classifier.logits(x).argmax(1)
        attr = integrated_gradients(classifier, x, target=target, steps=self.steps, tunnel=tunnel)
        if self.rule == "rcsb":
            heat, cells, region = rcsb_region(attr, self.area, self.cell, self.clip)
        else:  # cfx's earlier rule, on Σ_c |attr|
            heat = attr.abs().sum(dim=1)
            region = torch.stack([torch.from_numpy(cells_covering(h.numpy(), self.area, self.cell, self.clip))
                                  for h in heat])
            cells = None
        return RegionTrace(target=target.cpu(), attr=attr, heat=heat, cells=cells, region=region)

    def mask_for(self, item: InputImage, size: tuple[int, int], image=None, classifier=None) -> np.ndarray:
        import torch

        if image is None or classifier is None:
            raise UsageError("--region auto needs the image and a white-box classifier")
        if "gradients" not in classifier.capabilities:
            raise UsageError(f"--region auto: classifier {classifier.spec} gives no gradients (Integrated "
                             "Gradients needs a white-box classifier); pass --region FILE|DIR instead")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        return self.extract([item.id], x, classifier).region[0].numpy().astype(np.float32)


@hookimpl
def register_region_sources(register):
    register(AutoRegion)
