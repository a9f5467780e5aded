"""Shared plumbing of the pixel-diffusion explainers (DiME, ACE): per-image noise, resolution changes between
classifier and prior, and mask dilation. The prior itself is the model layer's (``cfx_cli.models.pixel_prior``).

Not an entry point itself; imported lazily by ``cfx_plugins.explainers.dime`` and ``cfx_plugins.explainers.ace``.
All noise math
(q_sample, the DDPM posterior with learned variance, respacing) comes from :mod:`cfx_cli.diffusion`.
"""

from __future__ import annotations

from typing import Any


class ImageNoise:
    """Gaussian noise drawn image by image from ``torch.Generator(seed_i)``: a picture's noise stream depends only
    on its own seed and on the steps it went through, never on which other images share its batch."""

    def __init__(self, seeds: list[int], device: str) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def randn(self, rows: list[int], shape: tuple[int, ...]):
        """(len(rows), *shape) standard normal, one draw of ``shape`` per listed image, in that order."""
        import torch

        return torch.stack([torch.randn(shape, generator=self.generators[i]) for i in rows]).to(self.device)


def to_size(images, size: tuple[int, int], nearest: bool = False):
    """Resize (N, C, H, W) images (no-op at the same size); bilinear+antialias, or nearest for masks."""
    import torch.nn.functional as F

    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if nearest:
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def model_size(model: Any, fallback: tuple[int, int]) -> tuple[int, int]:
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, tuple | list):
        return (int(size[0]), int(size[1]))
    return fallback


def dilate(mask, kernel: int):
    """Max filter of odd width ``kernel`` (ACE's dilation), keeping the size."""
    import torch.nn.functional as F

    if kernel <= 1:
        return mask
    return F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)
