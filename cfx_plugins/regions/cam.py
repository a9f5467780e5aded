"""``--region scorecam:LAYER`` and ``--region gradcam:LAYER``: ECED's key region (supplement, alg. 1) as a region.

The mask of an input is ``M = [U > ξ]`` with ``U`` the ScoreCAM (or Grad-CAM) map of the classifier's
**predicted class** for that input (ECED's "original label" y^F: cfx has no ground truth, and the predicted class
is the one a counterfactual moves away from) at ``LAYER`` (a dotted name from the classifier module's
``named_modules()``; empty = :func:`cfx_cli.saliency.default_layer`), normalised to [0, 1]; ξ comes from
``--set region_threshold=0.5``. The map is computed through the classifier's own forward (its resizing and
normalisation) on the input exactly as the explainer receives it. Needs a white-box (torch) classifier.
Details: docs/saliency.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cfx_cli import saliency
from cfx_cli.errors import InputError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.regions import RegionSource
from cfx_cli.saliency import find_layer, probe_layer

#: ξ when ``--set region_threshold`` is not given (the supplement gives no value; it varies ξ for diversity)
DEFAULT_THRESHOLD = 0.5


class _CamRegion(RegionSource):
    needs_classifier = True
    option_defaults: ClassVar[dict[str, Any]] = {"region_threshold": DEFAULT_THRESHOLD}
    #: the map's name in messages, and the function of :mod:`cfx_cli.saliency` that computes it
    label: ClassVar[str] = ""
    function: ClassVar[str] = ""

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None) -> None:
        opts = {**self.option_defaults, **(options or {})}
        super().__init__(arg, opts)
        self.spec = f"{self.scheme}:{arg}"
        try:
            xi = float(opts["region_threshold"])
        except (TypeError, ValueError):
            raise UsageError(f"--set region_threshold={opts['region_threshold']}: expected a number in [0, 1)") \
                from None
        if not 0.0 <= xi < 1.0:
            raise UsageError(f"--set region_threshold={xi}: must be in [0, 1) (the {self.label} map is normalised "
                             "to [0, 1] and the region is where it exceeds the threshold)")
        self.threshold = xi
        self.layer = arg.strip() or None
        self._resolved = False
        self.options = {"region_threshold": xi}

    def check(self, classifier: Any) -> None:
        """A white-box torch classifier and an existing layer, or one line saying what to do instead."""
        white = "gradients" in getattr(classifier, "capabilities", ()) and hasattr(classifier, "module")
        if not white:
            raise UsageError(f"--region {self.spec}: {self.label} needs a white-box (torch) classifier and "
                             f"{getattr(classifier, 'spec', 'this classifier')} is a black box; pass a mask "
                             "with --region FILE|DIR instead")
        self.layer, _ = find_layer(classifier, self.layer)
        size = getattr(classifier, "input_size", None)
        if size:  # a size-agnostic classifier is probed on the first real input instead
            probe_layer(classifier, self.layer, size)
        self.options["layer"] = self.layer  # recorded in run.json (region_options)
        self._resolved = True

    def mask_for(self, item, size, image=None, classifier=None):
        import numpy as np
        import torch

        if image is None or classifier is None:
            raise UsageError(f"--region {self.spec} needs the image and a white-box classifier")
        if not self._resolved:  # a worker that built its own copy (Ray) checks once here
            self.check(classifier)
        device = getattr(classifier, "device", "cpu")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float().to(device)
        with torch.no_grad():
            cls = classifier.logits(x).argmax(dim=1)
        cam = getattr(saliency, self.function)(classifier, self.layer, x, cls)
        if float(cam.max()) <= 0:
            name = classifier.labels[int(cls)] if getattr(classifier, "labels", None) else int(cls)
            raise InputError(f"{item.path}: the {self.label} map of class {name} at layer {self.layer} is zero "
                             "everywhere (no region raises the class score); name another layer "
                             f"({self.scheme}:LAYER) or pass a mask with --region FILE|DIR")
        mask = saliency.key_region(cam, self.threshold)[0].cpu().numpy().astype(np.float32)
        if mask.shape != tuple(size):
            raise InputError(f"{item.path}: {self.label} map is {mask.shape}, expected {tuple(size)}")
        return mask


class ScoreCamRegion(_CamRegion):
    scheme = "scorecam"
    summary = "ScoreCAM of the predicted class at LAYER (empty: last conv), thresholded at region_threshold"
    label = "ScoreCAM"
    function = "score_cam"


class GradCamRegion(_CamRegion):
    scheme = "gradcam"
    summary = "Grad-CAM of the predicted class at LAYER (empty: last conv), thresholded at region_threshold"
    label = "Grad-CAM"
    function = "grad_cam"


@hookimpl
def register_region_sources(register):
    register(ScoreCamRegion)
    register(GradCamRegion)
