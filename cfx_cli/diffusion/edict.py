"""EDICT: exactly invertible coupled DDIM (Wallace et al.; thesis eqs. 5.6–5.8). TIME's guidance (eq. 5.11)
is :mod:`cfx_cli.diffusion.guidance`.

Two latent streams x, y start equal to the encoded image. Denoising at timestep t (eq. 5.7)::

    x = a·x + b·ε(y);  y = a·y + b·ε(x);  x = p·x + (1-p)·y;  y = p·y + (1-p)·x

with a = √(ᾱ_prev/ᾱ_t), b = √(1-ᾱ_prev) − √(ᾱ_prev(1-ᾱ_t)/ᾱ_t) (eq. 5.6). Inversion (eq. 5.8) undoes the
four lines in reverse order. Timesteps follow diffusers' "leading" DDIM spacing with ``steps_offset``:
``ts = [i·ratio + offset]``, ratio = T_train // total_steps; inversion walks ``ts[:τ]`` upwards and
denoising walks the same list downwards.

Two ways of pairing noise levels during inversion (``mode``):

* ``exact`` (default): the inverse step at t moves between the same two levels (ᾱ[t−ratio] ↔ ᾱ[t]) that the
  denoising step at t uses, so denoising with the inversion's prompts returns the input latent up to float
  error.
* ``legacy``: the published TIME/EDICT code moves from ᾱ[t] to ᾱ[t+ratio] when inverting at t, so the inverted
  latent ends one level noisier than the denoiser assumes. Reproduces the published numbers; not exactly
  invertible. Above the last training step (τ = T only) the code's ``DDIMInverseScheduler`` (diffusers 0.16.1,
  built ``from_config`` of SD's DDIM config) ends at ᾱ = 0, where the inverted latent is the noise prediction
  itself; legacy does the same (``tests/fixtures/time-xcheck``).

Everything here is batched: x, y are (N, C, h, w); ``eps_fn(z, t)`` returns the (guided) noise prediction for
the whole batch; the guidance scale may be a per-image (N,) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EDICT_MODES = ("exact", "legacy")
EpsFn = Callable[["torch.Tensor", int], "torch.Tensor"]


def edict_timesteps(total_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """Ascending DDIM timesteps of a ``total_steps`` chain ("leading" spacing, as SD 1.x configures)."""
    if not 1 <= total_steps <= num_train_timesteps:
        raise ValueError(f"total_steps must be in 1..{num_train_timesteps}, got {total_steps}")
    ratio = num_train_timesteps // total_steps
    return [i * ratio + steps_offset for i in range(total_steps)]


def _level(alphas_cumprod: torch.Tensor, t: int, final_alpha_cumprod: float) -> float:
    # Below the first training step the chain ends at the scheduler's final level (ᾱ[0] for SD:
    # set_alpha_to_one false); above the last one (legacy pairing at τ = T only) at ᾱ = 0, as the authors'
    # inverse scheduler does.
    if t < 0:
        return final_alpha_cumprod
    if t >= len(alphas_cumprod):
        return 0.0
    return float(alphas_cumprod[t])


def edict_coefficients(ab_prev: float, ab_t: float) -> tuple[float, float]:
    """(a, b) of eq. 5.6 for a step between levels ᾱ_prev (less noisy) and ᾱ_t, in float64."""
    a = math.sqrt(ab_prev / ab_t)
    b = math.sqrt(1.0 - ab_prev) - math.sqrt(ab_prev * (1.0 - ab_t) / ab_t)
    return a, b


def edict_inverse_coefficients(ab_prev: float, ab_t: float) -> tuple[float, float]:
    """(c, d) with z_t = c·z_prev + d·ε, the inverse of z_prev = a·z_t + b·ε: c = 1/a, d = −b/a, written so that
    ᾱ_t = 0 (pure noise) is finite: c = √(ᾱ_t/ᾱ_prev), d = √(1−ᾱ_t) − √(ᾱ_t(1−ᾱ_prev)/ᾱ_prev)."""
    return math.sqrt(ab_t / ab_prev), math.sqrt(1.0 - ab_t) - math.sqrt(ab_t * (1.0 - ab_prev) / ab_prev)


def step_levels(t: int, ratio: int, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float,
                *, inverse: bool, mode: str) -> tuple[float, float]:
    """(ᾱ_prev, ᾱ_t) that the step at timestep ``t`` moves between."""
    if mode not in EDICT_MODES:
        raise ValueError(f"EDICT mode must be one of {', '.join(EDICT_MODES)}, got {mode!r}")
    if inverse and mode == "legacy":
        return (_level(alphas_cumprod, t, final_alpha_cumprod),
                _level(alphas_cumprod, t + ratio, final_alpha_cumprod))
    return (_level(alphas_cumprod, t - ratio, final_alpha_cumprod),
            _level(alphas_cumprod, t, final_alpha_cumprod))


def edict_invert(x: torch.Tensor, y: torch.Tensor, eps_fn: EpsFn, timesteps: Sequence[int], ratio: int,
                 alphas_cumprod: torch.Tensor, final_alpha_cumprod: float, p: float,
                 mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5.8 over ``timesteps`` (ascending: the first τ of the chain). Returns the noised (x, y)."""
    for t in timesteps:
        ab_prev, ab_t = step_levels(t, ratio, alphas_cumprod, final_alpha_cumprod, inverse=True, mode=mode)
        c, d = edict_inverse_coefficients(ab_prev, ab_t)
        y = (y - (1 - p) * x) / p
        x = (x - (1 - p) * y) / p
        y = c * y + d * eps_fn(x, t)
        x = c * x + d * eps_fn(y, t)
    return x, y


def edict_denoise(x: torch.Tensor, y: torch.Tensor, eps_fn: EpsFn, timesteps: Sequence[int], ratio: int,
                  alphas_cumprod: torch.Tensor, final_alpha_cumprod: float,
                  p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5.7 over ``timesteps`` walked downwards (pass the same ascending list as to the inversion)."""
    for t in reversed(list(timesteps)):
        ab_prev, ab_t = step_levels(t, ratio, alphas_cumprod, final_alpha_cumprod, inverse=False,
                                    mode="exact")
        a, b = edict_coefficients(ab_prev, ab_t)
        x = a * x + b * eps_fn(y, t)
        y = a * y + b * eps_fn(x, t)
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    return x, y

