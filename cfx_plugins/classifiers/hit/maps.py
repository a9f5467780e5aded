"""HiT maps through a cfx classifier: the exact per-patch decomposition and the rollout, on [0, 1] images.

The classifier may wrap the HiT in anything (``hit:``'s normalisation, a ``python:`` factory's own module, the
input resizing of :class:`cfx_cli.whitebox.TorchModuleClassifier`): the HiT's actual input is captured by a
forward pre-hook during one pass of ``classifier.logits``, then decomposed. Maps are on the patch grid (B, h, w).
"""

from __future__ import annotations

from typing import Any

import torch

from cfx_cli.errors import UsageError
from cfx_cli.images import resize_images
from cfx_plugins.classifiers.hit.model import HiT


def find_hit(classifier: Any) -> HiT | None:
    """The one :class:`HiT` inside a white-box classifier (or module), else None."""
    root = classifier if isinstance(classifier, torch.nn.Module) else getattr(classifier, "module", None)
    if not isinstance(root, torch.nn.Module):
        return None
    found = [m for m in root.modules() if isinstance(m, HiT)]
    return found[0] if len(found) == 1 else None


def require_hit(classifier: Any, what: str) -> HiT:
    hit = find_hit(classifier)
    if hit is None:
        spec = getattr(classifier, "spec", type(classifier).__name__)
        raise UsageError(f"{what} needs a HiT classifier (hit:CONFIG@WEIGHTS, demo:hit-digits, or a python: "
                         f"factory returning cfx's HiT); {spec} is not one")
    return hit


def hit_input(classifier: Any, images: torch.Tensor) -> tuple[HiT, torch.Tensor, torch.Tensor]:
    """(the HiT, its input for ``images`` after the classifier's preprocessing, the classifier's logits)."""
    hit = require_hit(classifier, "a HiT map")
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, args):
        seen["x"] = args[0].detach()

    forward = classifier if isinstance(classifier, torch.nn.Module) else classifier.logits
    handle = hit.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            logits = forward(images)
    finally:
        handle.remove()
    return hit, seen["x"], logits


def hit_maps(classifier: Any, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """HiT's saliency map of ``classes`` (default: the predicted class) per image: (B, h, w) logit contributions
    of each patch (they sum, with the head bias, to that class's logit)."""
    hit, x, logits = hit_input(classifier, images)
    with torch.no_grad():
        d = hit.decompose(x)
        cls = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
        return d.patch_map(cls)


def rollout_maps(classifier: Any, images: torch.Tensor) -> torch.Tensor:
    """The thesis' adapted rollout on HiT (CLS attention averaged over heads and layers): (B, h, w)."""
    hit, x, _ = hit_input(classifier, images)
    with torch.no_grad():
        return hit.rollout(x)


def to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) patch maps → (B, H, W), each patch's value over its pixels (nearest)."""
    return resize_images(maps[:, None].float(), tuple(size), nearest=True)[:, 0]
