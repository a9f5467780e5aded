"""I2SB (Liu et al., 2023, "I²SB: Image-to-Image Schrödinger Bridge") noise math.

The bridge runs between a clean image x_0 (step 0) and a degraded one x_1 (step ``interval``-1) with a symmetric
beta schedule. With σ_t² = Σ_{s≤t} β_s (forward) and σ̄_t² = Σ_{s≥t} β_s (backward), the marginal of the
Schrödinger bridge given both ends is Gaussian (paper eq. 11):

    x_t ~ N( σ̄²/(σ²+σ̄²) x_0 + σ²/(σ²+σ̄²) x_1 ,  σ²σ̄²/(σ²+σ̄²) )

The network predicts (x_t - x_0)/σ_t (eq. 12), so x̂_0 = x_t - σ_t·net. Sampling walks from x_1 towards 0 with
the DDPM posterior p(x_n | x_N, x̂_0) (eq. 4) between two steps n < N: mean
σ_Δ²/(σ_n²+σ_Δ²) x̂_0 + σ_n²/(σ_n²+σ_Δ²) x_N with σ_Δ² = σ_N² - σ_n²; the OT-ODE drops the noise term.
Conventions (the schedule, network time = linspace(t0, T, interval)·interval, evenly spaced sampling steps
rounded with Python's round, the inpainting paste of x_1 outside the mask) follow NVlabs/I2SB.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cfx_cli.diffusion.gaussian import broadcast
from cfx_cli.diffusion.schedules import i2sb_betas


def gaussian_product_coef(sigma1: torch.Tensor, sigma2: torch.Tensor):
    """N(x|x_a, σ1²)·N(x|x_b, σ2²) ∝ N(x | c1 x_a + c2 x_b, var): returns (c1, c2, var)."""
    denom = sigma1**2 + sigma2**2
    return sigma2**2 / denom, sigma1**2 / denom, sigma1**2 * sigma2**2 / denom


def space_indices(num_steps: int, count: int) -> list[int]:
    """``count`` indices evenly spread over 0 … num_steps-1, first and last included (I2SB's sampling steps)."""
    if count > num_steps:
        raise ValueError(f"cannot take {count} steps out of {num_steps}")
    stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):  # accumulate the float stride (not i * stride): the same rounding as I2SB
        steps.append(round(cur))
        cur += stride
    return steps


class BridgeSchedule:
    def __init__(self, betas: torch.Tensor, t0: float = 1e-4, T: float = 1.0) -> None:
        betas = betas.double()
        self.betas = betas
        self.interval = len(betas)
        self.std_fwd = torch.cumsum(betas, 0).sqrt()
        self.std_bwd = torch.cumsum(betas.flip(0), 0).flip(0).sqrt()
        self.mu_x0, self.mu_x1, var = gaussian_product_coef(self.std_fwd, self.std_bwd)
        self.std_sb = var.sqrt()
        # the network's time input for each step, computed in float32 as I2SB's Runner (and RCSB's CDDB) do:
        # linspace(t0, T, interval) * interval; a float64 linspace differs by up to 6e-5
        self.noise_levels = torch.linspace(t0, T, self.interval, dtype=torch.float32) * self.interval

    @classmethod
    def from_options(
        cls, interval: int = 1000, beta_max: float = 1.0, t0: float = 1e-4, T: float = 1.0
    ) -> BridgeSchedule:
        return cls(i2sb_betas(interval, beta_max), t0, T)

    def network_time(self, step: torch.Tensor | int, batch: int | None = None) -> torch.Tensor:
        if not torch.is_tensor(step):
            step = torch.full((batch or 1,), int(step), dtype=torch.long)
        return self.noise_levels.to(step.device)[step.long()]

    def q_sample(
        self,
        step: torch.Tensor | int,
        x0: torch.Tensor,
        x1: torch.Tensor,
        ot_ode: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t from the bridge marginal between x0 and x1 (the mean only under the OT-ODE)."""
        xt = broadcast(self.mu_x0, step, x0) * x0 + broadcast(self.mu_x1, step, x0) * x1
        if not ot_ode:
            noise = torch.randn_like(xt) if noise is None else noise
            xt = xt + broadcast(self.std_sb, step, x0) * noise
        return xt

    def pred_x0(
        self, step: torch.Tensor | int, x_t: torch.Tensor, net_out: torch.Tensor, clip_denoise: bool = False
    ) -> torch.Tensor:
        """Tweedie-style estimate x̂_0 = x_t - σ_t · net(x_t, t)."""
        x0 = x_t - broadcast(self.std_fwd, step, x_t) * net_out
        return x0.clamp(-1, 1) if clip_denoise else x0

    def posterior_coefs(self, nprev: torch.Tensor | int, n: torch.Tensor | int, like: torch.Tensor):
        std_n = broadcast(self.std_fwd, n, like)
        std_prev = broadcast(self.std_fwd, nprev, like)
        std_delta = (std_n**2 - std_prev**2).clamp_min(0).sqrt()
        return gaussian_product_coef(std_prev, std_delta)

    def posterior_step(
        self,
        nprev: torch.Tensor | int,
        n: torch.Tensor | int,
        x_n: torch.Tensor,
        x0: torch.Tensor,
        ot_ode: bool = True,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{nprev} from p(x_{nprev} | x_n, x̂_0), nprev < n; deterministic under the OT-ODE (and at nprev = 0)."""
        c0, cn, var = self.posterior_coefs(nprev, n, x_n)
        out = c0 * x0 + cn * x_n
        if not ot_ode:
            noise = torch.randn_like(out) if noise is None else noise
            nz = (torch.as_tensor(nprev, device=x_n.device).reshape(-1) > 0).to(x_n.dtype)
            out = out + nz.reshape(-1, *([1] * (x_n.ndim - 1))) * var.sqrt() * noise
        return out

    def truncation_step(self, tau: float) -> int:
        """The last step of a trajectory truncated at τ, as RCSB's code indexes it: its config's ``start_step`` is
        round(τ·interval), the start state is the bridge mean at ``start_step − 1`` (where the first network call
        also runs) and the steps are ``space_indices(start_step, nfe + 1)``. τ = 1 is the whole trajectory."""
        return max(1, min(self.interval, round(tau * self.interval)) - 1)

    def sampling_steps(self, nfe: int, start_step: int | None = None) -> list[int]:
        """Ascending steps [0, …, start] with ``nfe`` intervals; ``start_step`` < interval-1 truncates the
        trajectory (RCSB starts at τ·T with the original content available)."""
        last = self.interval - 1 if start_step is None else int(start_step)
        if not 0 < nfe <= last:
            raise ValueError(f"nfe must be in 1…{last}")
        return space_indices(last + 1, nfe + 1)

    def sample(
        self,
        pred_x0_fn: Callable[[torch.Tensor, int], torch.Tensor],
        x_start: torch.Tensor,
        nfe: int,
        ot_ode: bool = True,
        mask: torch.Tensor | None = None,
        x1: torch.Tensor | None = None,
        start_step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the sampler from ``x_start`` (x_1, or an x_t at ``start_step``) down to step 0.

        ``pred_x0_fn(x_t, step)`` returns x̂_0. With a ``mask`` (1 = to generate), the known region is reset
        to ``x1`` (plus bridge noise when stochastic) after every step, as in I2SB's inpainting sampler.
        """
        steps = self.sampling_steps(nfe, start_step)[::-1]
        xt = x_start
        known = x1 if x1 is not None else x_start
        for step, prev in zip(steps[:-1], steps[1:], strict=True):
            x0 = pred_x0_fn(xt, step)
            noise = None if ot_ode else torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
            xt = self.posterior_step(prev, step, xt, x0, ot_ode=ot_ode, noise=noise)
            if mask is not None:
                xt_true = known
                if not ot_ode:
                    n2 = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
                    xt_true = known + broadcast(self.std_sb, prev, xt) * n2
                xt = (1 - mask) * xt_true + mask * xt
        return xt
