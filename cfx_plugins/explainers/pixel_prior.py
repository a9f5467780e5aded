"""Shared plumbing of the pixel-diffusion explainers (DiME, ACE): the prior behind ``--model`` and its size.

Not an entry point itself; imported lazily by ``cfx_plugins.explainers.dime`` and ``cfx_plugins.explainers.ace``.
All noise math (q_sample, the DDPM posterior with learned variance, respacing) comes from :mod:`cfx_cli.diffusion`,
the per-image noise from :mod:`cfx_cli.diffusion.noise`, resizing from :func:`cfx_cli.images.resize_images`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cfx_cli.errors import UsageError

#: the embedded pixel DDPM trained on the demo digits (cfx_cli.demo.generators), used when --model is absent
DEFAULT_MODEL = "demo:pixel"


def load_prior(context, respacing: str, method: str) -> tuple[Any, str]:
    """The pixel diffusion model of ``--model`` (or the demo DDPM), on ``respacing`` of its original schedule.

    ``respacing`` uses guided-diffusion's ``timestep_respacing`` syntax (``"200"``, ``"ddim50"``); ``""`` keeps
    the schedule as loaded (for ADM checkpoints, the flags' ``--timestep_respacing``)."""
    from cfx_cli.models import load_model

    spec = context.model or DEFAULT_MODEL
    model = as_pixel_model(load_model(spec, context.model_flags, context.device, context.trust_pickle), spec, method)
    if respacing:
        try:
            if hasattr(model, "with_respacing"):  # ADM: respaced from the base schedule the flags describe
                model = model.with_respacing(respacing)
            else:
                model = dataclasses.replace(model, diffusion=model.diffusion.respaced(respacing))
        except ValueError as exc:
            raise UsageError(f"{method}: --set respacing={respacing!r}: {exc}") from None
    return model, spec


def as_pixel_model(model: Any, spec: str, method: str) -> Any:
    """Accept the model layer's pixel models, or a bare ``(unet, scheduler)`` holder such as the demo's."""
    if getattr(model, "kind", None) == "pixel" and getattr(model, "diffusion", None) is not None:
        return model
    unet, scheduler = getattr(model, "unet", None), getattr(model, "scheduler", None)
    if unet is not None and scheduler is not None and type(unet).__name__ == "UNet2DModel":
        from cfx_cli.models.diffusers_models import PixelDiffusersModel, diffusion_from_scheduler

        learned = unet.config.out_channels == 2 * unet.config.in_channels
        device = str(next(unet.parameters()).device)
        unet.eval().requires_grad_(False)
        return PixelDiffusersModel(unet, diffusion_from_scheduler(scheduler, learned), scheduler, device,
                                   next(unet.parameters()).dtype, spec)
    kind = getattr(model, "kind", type(model).__name__)
    raise UsageError(f"--model {spec}: {method} needs a pixel diffusion model (an ADM checkpoint, a diffusers "
                     f"UNet2DModel folder or demo:pixel), got a {kind} model")


def schedule_summary(model: Any) -> str:
    d = model.diffusion
    return f"{d.num_steps} of {d.original_num_steps} steps, variance {d.variance_type}"


def model_size(model: Any, fallback: tuple[int, int]) -> tuple[int, int]:
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, tuple | list):
        return (int(size[0]), int(size[1]))
    return fallback
