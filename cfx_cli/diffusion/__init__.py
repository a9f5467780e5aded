"""Shared diffusion math: schedules and respacing, Gaussian DDPM/DDIM steps, Tweedie estimates, the I2SB bridge.

Every explainer uses these instead of re-deriving them. Pure tensor functions; no model code here.
"""

from cfx_cli.diffusion.bridge import BridgeSchedule, gaussian_product_coef, space_indices
from cfx_cli.diffusion.gaussian import (
    DiffusionOutput,
    GaussianDiffusion,
    broadcast,
    ddim_step_from_alphas,
    ddim_transfer,
    eps_from_output,
    q_sample_at,
    tweedie_x0,
)
from cfx_cli.diffusion.schedules import (
    betas_for_alpha_bar,
    get_beta_schedule,
    i2sb_betas,
    respace_betas,
    space_timesteps,
)

__all__ = [
    "BridgeSchedule",
    "DiffusionOutput",
    "GaussianDiffusion",
    "betas_for_alpha_bar",
    "broadcast",
    "ddim_step_from_alphas",
    "ddim_transfer",
    "eps_from_output",
    "gaussian_product_coef",
    "get_beta_schedule",
    "i2sb_betas",
    "q_sample_at",
    "respace_betas",
    "space_indices",
    "space_timesteps",
    "tweedie_x0",
]
