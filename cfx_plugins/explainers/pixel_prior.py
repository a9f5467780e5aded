"""Shared plumbing of the pixel-diffusion explainers (DiME, ACE): the prior's size. The prior itself is the model
layer's (:class:`cfx_cli.models.pixel.PixelModel`, loaded by ``cfx_cli.models.model_for``).

Not an entry point itself; imported lazily by ``cfx_plugins.explainers.dime`` and ``cfx_plugins.explainers.ace``.
All noise math (q_sample, the DDPM posterior with learned variance, respacing) comes from :mod:`cfx_cli.diffusion`,
the per-image noise from :mod:`cfx_cli.diffusion.noise`, resizing from :func:`cfx_cli.images.resize_images`.
"""

from __future__ import annotations

from typing import Any


def model_size(model: Any, fallback: tuple[int, int]) -> tuple[int, int]:
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, tuple | list):
        return (int(size[0]), int(size[1]))
    return fallback
