"""``--region hit``: the region of a HiT classifier's own, exact saliency map (thesis ch. 6).

The map of an input is the per-patch decomposition of the **predicted class**'s logit
(:meth:`cfx_plugins.classifiers.hit.model.HiT.decompose`: no gradients, no post-hoc method), computed through
the classifier's own preprocessing on the input exactly as the explainer receives it. The region is made of
whole patches, either

- ``--set region_area=a`` (default 0.3, as ``--region auto``): the highest-contributing patches, in the order the
  insertion metric inserts them, until they cover at least a fraction a of the patches; or
- ``--set region_threshold=ξ``: the patches whose contribution exceeds ξ times the largest one (ξ in [0, 1);
  ξ = 0 keeps every patch that raises the class).

Needs a HiT classifier (``hit:CONFIG@WEIGHTS``, ``demo:hit-digits`` or a ``python:`` factory returning cfx's HiT).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from cfx_cli.errors import InputError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.regions import RegionSource

DEFAULT_AREA = 0.3


class HiTRegion(RegionSource):
    scheme = "hit"
    summary = ("HiT's exact map of the predicted class: the top patches covering region_area (0.3), or those above "
               "region_threshold × the largest")
    needs_classifier = True
    option_defaults: ClassVar[dict[str, Any]] = {"region_area": DEFAULT_AREA, "region_threshold": None}

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None) -> None:
        given = dict(options or {})
        super().__init__(arg, given)
        self.spec = f"hit:{arg}" if arg else "hit"
        if arg.strip():
            raise UsageError(f"--region hit:{arg}: takes no argument (the map is that of the predicted class)")
        if "region_area" in given and given.get("region_threshold") is not None:
            raise UsageError("--set region_area and region_threshold: give one (--region hit takes the top patches "
                             "covering the area, or those above the threshold)")
        self.threshold: float | None = None
        self.area: float | None = None
        if given.get("region_threshold") is not None:
            try:
                self.threshold = float(given["region_threshold"])
            except (TypeError, ValueError):
                raise UsageError(f"--set region_threshold={given['region_threshold']}: expected a number in "
                                 "[0, 1)") from None
            if not 0.0 <= self.threshold < 1.0:
                raise UsageError(f"--set region_threshold={self.threshold}: must be in [0, 1) (a fraction of the "
                                 "largest patch contribution)")
            self.options = {"region_threshold": self.threshold}
        else:
            try:
                self.area = float(given.get("region_area", DEFAULT_AREA))
            except (TypeError, ValueError):
                raise UsageError(f"--set region_area={given['region_area']}: expected a number in (0, 1]") from None
            if not 0.0 < self.area <= 1.0:
                raise UsageError(f"--set region_area={self.area}: must be in (0, 1]")
            self.options = {"region_area": self.area}

    def check(self, classifier: Any) -> None:
        from cfx_plugins.classifiers.hit.maps import require_hit

        require_hit(classifier, "--region hit")

    def mask_for(self, item, size, image=None, classifier=None):
        import numpy as np
        import torch

        from cfx_plugins.classifiers.hit.maps import hit_maps, to_image

        if image is None or classifier is None:
            raise UsageError("--region hit needs the image and the HiT classifier")
        device = getattr(classifier, "device", "cpu")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float().to(device)
        grid = hit_maps(classifier, x)[0].cpu()
        mask = patch_region(grid, area=self.area, threshold=self.threshold)
        if mask is None:
            raise InputError(f"{item.path}: no patch of the HiT map raises the predicted class (every contribution "
                             "≤ 0), so region_threshold selects nothing; use region_area instead")
        return to_image(mask[None], tuple(size))[0].numpy().astype(np.float32)


def patch_region(grid, area: float | None = None, threshold: float | None = None):
    """Binary (h, w) patch mask of a (h, w) map: the top ⌈a·P⌉ patches (stable order), or those above
    ``threshold`` × the maximum (None when the maximum is not positive)."""
    import torch

    flat = grid.reshape(-1).double()
    if threshold is not None:
        top = float(flat.max())
        if top <= 0:
            return None
        return (grid.double() > threshold * top).float()
    k = max(1, math.ceil(area * flat.numel() - 1e-9))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[order] = 1.0
    return mask.reshape(grid.shape).float()


@hookimpl
def register_region_sources(register):
    register(HiTRegion)
