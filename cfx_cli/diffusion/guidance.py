"""Classifier-free guidance (Ho & Salimans 2022) and TIME's negative guidance (thesis eq. 5.11), one formula.

ε = ε(neg) + g·(ε(pos) − ε(neg)) = (1+w)·ε(pos) − w·ε(neg) with g = 1 + w. Classifier-free guidance is the case
neg = the empty prompt (ECED); TIME puts the other class's prompt there. Both conditionings go through the network
in one call of batch 2N, negative first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cfx_cli.diffusion.edict import EpsFn

if TYPE_CHECKING:
    import torch

#: a conditional noise predictor ε(z, t, embeddings)
CondEpsFn = Callable[["torch.Tensor", int, "torch.Tensor"], "torch.Tensor"]


def guided_eps(eps_pos: torch.Tensor, eps_neg: torch.Tensor, g: float | torch.Tensor) -> torch.Tensor:
    """ε(neg) + g·(ε(pos) − ε(neg)); ``g`` is a float or a per-image (N,) tensor."""
    if not isinstance(g, int | float):
        g = g.reshape(-1, *([1] * (eps_pos.ndim - 1))).to(eps_pos)
    return eps_neg + g * (eps_pos - eps_neg)


def guided_eps_fn(unet_eps: CondEpsFn, positive: torch.Tensor, negative: torch.Tensor,
                  g: float | torch.Tensor) -> EpsFn:
    """Wrap ``unet_eps(z, t, embeds)`` into the guided ε(z, t) of the prompts ``positive`` over ``negative``."""
    import torch

    embeds = torch.cat([negative, positive])

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        eps_neg, eps_pos = unet_eps(torch.cat([z, z]), t, embeds).chunk(2)
        return guided_eps(eps_pos, eps_neg, g)

    return eps
