"""Gaussian diffusion (DDPM/DDIM) math, batched with per-sample timesteps.

``GaussianDiffusion`` holds one (possibly respaced) schedule in float64 and gives q_sample, the DDPM posterior,
p_mean_variance from a network output (fixed or learned-range variance, ADM's ``learn_sigma``), DDPM and DDIM
steps and Tweedie x̂_0 estimates. Timesteps ``t`` are indices into *this* schedule (0 … num_steps-1), either an
int or an (N,) tensor; ``model_timesteps(t)`` maps them to the times the network was trained with.

The free functions at the bottom work on explicit ᾱ values, for samplers that pair noise levels their own way
(EDICT, TIME's published pairing, diffusers' ``steps_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfx_cli.diffusion.schedules import get_beta_schedule, respace_betas, space_timesteps

VARIANCE_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")


def broadcast(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped (N, 1, 1, …) to broadcast against ``like``, in ``like``'s dtype/device."""
    if not torch.is_tensor(t):
        t = torch.full((like.shape[0],), int(t), dtype=torch.long)
    out = values.to(t.device)[t.long()]
    if out.ndim == 0:
        out = out.expand(like.shape[0])
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


@dataclass
class DiffusionOutput:
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    def __init__(
        self,
        betas: torch.Tensor,
        timestep_map: list[int] | None = None,
        original_num_steps: int | None = None,
        variance_type: str = "fixed_small",
        rescale_timesteps: bool = False,
        prediction_type: str = "epsilon",
    ) -> None:
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {variance_type!r} not in {VARIANCE_TYPES}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError("prediction_type must be 'epsilon', 'sample' (x_start) or 'v_prediction'")
        betas = betas.double()
        self.betas = betas
        self.num_steps = len(betas)
        self.timestep_map = torch.tensor(
            timestep_map if timestep_map is not None else range(self.num_steps), dtype=torch.long
        )
        self.original_num_steps = original_num_steps or self.num_steps
        self.variance_type = variance_type
        self.rescale_timesteps = rescale_timesteps
        self.prediction_type = prediction_type
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        self.alphas = alphas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod_next = torch.cat([ac[1:], ac.new_zeros(1)])
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / ac - 1).sqrt()
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - ac)
        # the posterior variance is 0 at t = 0: clip the log by repeating the value at t = 1
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = (
            torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 else torch.log(pv.clamp_min(1e-20))
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / (1 - ac)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        num_steps: int = 1000,
        schedule: str = "linear",
        respacing: str = "",
        learn_sigma: bool = False,
        sigma_small: bool = False,
        rescale_timesteps: bool = False,
        predict_xstart: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
    ) -> GaussianDiffusion:
        """As guided-diffusion's ``create_gaussian_diffusion``: a base schedule, optionally respaced."""
        betas = get_beta_schedule(schedule, num_steps, beta_start, beta_end)
        variance = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
        prediction = "sample" if predict_xstart else "epsilon"
        if respacing:
            new_betas, tmap = respace_betas(betas, space_timesteps(num_steps, respacing))
            return cls(new_betas, tmap, num_steps, variance, rescale_timesteps, prediction)
        return cls(betas, None, num_steps, variance, rescale_timesteps, prediction)

    def respaced(self, respacing: str) -> GaussianDiffusion:
        """This schedule restricted to a subset of its steps (indices map back to the original model times)."""
        keep = space_timesteps(self.num_steps, respacing)
        new_betas, tmap = respace_betas(self.betas, keep)
        original = self.timestep_map[tmap].tolist()
        return GaussianDiffusion(
            new_betas,
            original,
            self.original_num_steps,
            self.variance_type,
            self.rescale_timesteps,
            self.prediction_type,
        )

    def model_timesteps(self, t: torch.Tensor | int, batch: int | None = None) -> torch.Tensor:
        """Network input times for schedule indices ``t``: the original step (respacing), scaled to 0–1000 when
        ``rescale_timesteps``. float32 (N,)."""
        if not torch.is_tensor(t):
            t = torch.full((batch or 1,), int(t), dtype=torch.long)
        out = self.timestep_map.to(t.device)[t.long()].float()
        if self.rescale_timesteps:
            out = out * (1000.0 / self.original_num_steps)
        return out

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            broadcast(self.sqrt_alphas_cumprod, t, x0) * x0
            + broadcast(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = broadcast(self.posterior_mean_coef1, t, x_t) * x0 + broadcast(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, broadcast(self.posterior_variance, t, x_t), broadcast(self.posterior_log_variance_clipped, t, x_t)

    # -- Tweedie / parametrisation conversions ----------------------------------------------------
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie's estimate x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t."""
        return (
            broadcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - broadcast(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        return (broadcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / broadcast(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance part or None) of a network output; learned variance doubles the channels."""
        if self.variance_type in ("learned", "learned_range"):
            c = x_t.shape[1]
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned variance expects {2 * c} output channels, got {model_output.shape[1]}")
            return model_output[:, :c], model_output[:, c:]
        return model_output[:, : x_t.shape[1]], None

    def eps_and_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.split_output(model_output, x_t)
        if self.prediction_type == "v_prediction":
            a, s = broadcast(self.sqrt_alphas_cumprod, t, x_t), broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t)
            out = eps_from_output(out, x_t, a, s, "v_prediction")
        if self.prediction_type in ("epsilon", "v_prediction"):
            eps, x0 = out, self.predict_x0_from_eps(x_t, t, out)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = self.predict_eps_from_x0(x_t, t, x0)
            return eps, x0
        x0 = out.clamp(-1, 1) if clip_denoised else out
        return self.predict_eps_from_x0(x_t, t, x0), x0

    # -- reverse process ------------------------------------------------------------------------
    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, clip_denoised: bool = False
    ) -> DiffusionOutput:
        """p(x_{t-1} | x_t) from the network output (ADM ``p_mean_variance``).

        Learned range (ADM ``learn_sigma``): the extra channels v ∈ [-1, 1] interpolate the log-variance between
        the posterior's clipped log-variance and log β_t: log σ² = ((v+1)/2) log β_t + (1-(v+1)/2) log β̃_t.
        """
        mean_part, var_part = self.split_output(model_output, x_t)
        if self.variance_type == "learned_range":
            min_log = broadcast(self.posterior_log_variance_clipped, t, x_t)
            max_log = broadcast(torch.log(self.betas), t, x_t)
            frac = (var_part + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        elif self.variance_type == "learned":
            log_var, var = var_part, torch.exp(var_part)
        elif self.variance_type == "fixed_large":
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            var = broadcast(large, t, x_t)
            log_var = broadcast(torch.log(large), t, x_t)
        else:
            var = broadcast(self.posterior_variance, t, x_t)
            log_var = broadcast(self.posterior_log_variance_clipped, t, x_t)
        eps, x0 = self.eps_and_x0(model_output, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return DiffusionOutput(mean=mean, variance=var, log_variance=log_var, pred_x0=x0, eps=eps)

    def ddpm_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
        mean_shift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DiffusionOutput]:
        """One ancestral step x_t → x_{t-1} ~ N(μ + shift, σ²); no noise where t = 0.

        ``mean_shift`` is added to the mean (classifier guidance: ``-variance * grad`` as in DiME eq. 3.4)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        mean = out.mean if mean_shift is None else out.mean + mean_shift
        noise = torch.randn_like(x_t) if noise is None else noise
        nonzero = (self._as_batch(t, x_t) != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM x_t → x_{t-1} on this schedule's ᾱ (prev = ᾱ_{t-1}, 1 at t = 0). Returns (x_prev, x̂_0)."""
        eps, x0 = self.eps_and_x0(model_output, x_t, t, clip_denoised)
        ab_t = broadcast(self.alphas_cumprod, t, x_t)
        ab_prev = broadcast(self.alphas_cumprod_prev, t, x_t)
        if eta > 0 and noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (self._as_batch(t, x_t) != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return ddim_step_from_alphas(x0, eps, ab_t, ab_prev, eta, noise, nonzero), x0

    def ddim_reverse_step(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic DDIM inversion x_t → x_{t+1} (ᾱ_next; guided-diffusion ``ddim_reverse_sample``)."""
        eps, x0 = self.eps_and_x0(model_output, x_t, t, clip_denoised)
        ab_next = broadcast(self.alphas_cumprod_next, t, x_t)
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps, x0

    @staticmethod
    def _as_batch(t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(t):
            return t.to(like.device).reshape(-1).expand(like.shape[0]) if t.numel() == 1 else t.to(like.device)
        return torch.full((like.shape[0],), int(t), device=like.device)


# -- schedule-free helpers (explicit ᾱ values, broadcastable tensors) ------------------------------
def q_sample_at(x0: torch.Tensor, alpha_bar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ x_0 + √(1-ᾱ) ε at an explicit level ᾱ (a float or a tensor broadcasting against x_0)."""
    ab = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def eps_from_output(
    out: torch.Tensor, x_t: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_one_minus_ab: torch.Tensor, prediction: str
) -> torch.Tensor:
    """ε from a network output of any parametrisation, with √ᾱ_t and √(1-ᾱ_t) broadcastable to ``x_t``:
    ε itself; v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho; SD 2.x 768-v) → ε = √ᾱ v + √(1-ᾱ) x_t;
    x̂_0 ("sample") → ε = (x_t - √ᾱ x̂_0) / √(1-ᾱ)."""
    if prediction == "epsilon":
        return out
    if prediction == "v_prediction":
        return sqrt_ab * out + sqrt_one_minus_ab * x_t
    if prediction == "sample":
        return (x_t - sqrt_ab * out) / sqrt_one_minus_ab
    raise ValueError(f"prediction type {prediction!r} is not epsilon, v_prediction or sample")


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t - √(1-ᾱ) ε) / √ᾱ."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def ddim_step_from_alphas(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    nonzero: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """DDIM update (Song et al. eq. 12): √ᾱ' x̂_0 + √(1-ᾱ'-σ²) ε + σ z with
    σ = η √((1-ᾱ')/(1-ᾱ)) √(1-ᾱ/ᾱ'). Works in either direction when η = 0 (ᾱ' > ᾱ denoises, < inverts)."""
    if eta == 0:
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    out = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp_min(0).sqrt() * eps
    return out + nonzero * sigma * noise if noise is not None else out


def ddim_transfer(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_from: torch.Tensor, alpha_bar_to: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM move of x between two noise levels given ε (denoising or inversion):
    x' = √(ᾱ'/ᾱ) x + (√(1-ᾱ') - √(ᾱ'(1-ᾱ)/ᾱ)) ε — the (a, b) form used by EDICT/TIME (thesis eq. 5.6)."""
    a = (alpha_bar_to / alpha_bar_from).sqrt()
    b = (1 - alpha_bar_to).sqrt() - (alpha_bar_to * (1 - alpha_bar_from) / alpha_bar_from).sqrt()
    return a * x_t + b * eps
