"""ECED's algorithms 2 and 3 on a latent text-to-image model (:class:`cfx_cli.models.LatentModel`).

- :func:`preserve_background` (Alg. 2): Adam on the background latent z^bg and on a *copy* of the VAE decoder's
  weights, minimising the background MSE (eq. 12) of D(√α_0·z_init + √(1−α_0)·ε) against the input.
- :func:`blended_chain` (Alg. 3, lines 6–11): blended latent diffusion from z_init with the target prompt;
  differentiable w.r.t. z_init (optionally with gradient checkpointing per step).
- :func:`prune` (Alg. 3, line 14; Proposition 1): the latent mask applied to the gradient.

All noise math comes from :mod:`cfx_cli.diffusion` (guidance, the per-image noise source), Adam from
:mod:`cfx_cli.optim`, resizing from :func:`cfx_cli.images.resize_images`. Imported lazily by the explainer (torch at
module level).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from cfx_cli.backends.grad import FP32, GradPrecision
from cfx_cli.diffusion import ddim_step_from_alphas, q_sample_at, tweedie_x0
from cfx_cli.diffusion.edict import edict_timesteps, step_levels
from cfx_cli.diffusion.guidance import guided_eps_fn
from cfx_cli.diffusion.noise import BatchNoise
from cfx_cli.errors import UsageError


# -- prompts -------------------------------------------------------------------------------------------------
def fill_prompt(template: str, label: str) -> str:
    """``"A photo of a/an {target}"`` → "A photo of an owl": ``{target}`` is the class name and "a/an" becomes
    the article that fits the word after it."""
    if "{target}" not in template:
        raise UsageError(f"eced: --set prompt={template!r} must contain {{target}}")
    text = template.replace("{target}", label)

    def article(m: re.Match) -> str:
        word = m.group(2)
        an = word[:1].lower() in "aeiou"
        art = "an" if an else "a"
        return (art.capitalize() if m.group(1)[0].isupper() else art) + " " + word

    return re.sub(r"\b([Aa])/an\s+(\S+)", article, text)


def class_names(labels: list[str], names: str) -> list[str]:
    """The words that stand for the classes in prompts: the labels, or ``names`` (comma list) when given."""
    if not names.strip():
        return list(labels)
    out = [n.strip() for n in names.split(",")]
    if len(out) != len(labels):
        raise UsageError(f"eced: --set class_names has {len(out)} names but the classifier has {len(labels)} "
                         "labels")
    return out


# -- Proposition 1 -------------------------------------------------------------------------------------------
def prune(grad: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """v = m' ⊙ u: the gradient (N, C, h, w) kept only in the foreground of the latent mask (N, 1, h, w),
    the mask repeated over the C channels (the supplement's c(·))."""
    return grad * latent_mask.to(grad.dtype).expand_as(grad)


def angle_degrees(u: torch.Tensor, v: torch.Tensor) -> float:
    """∠(u, v) in degrees for flattened vectors (float64)."""
    u, v = u.double().flatten(), v.double().flatten()
    cos = (u @ v) / (u.norm() * v.norm())
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))


# -- eq. 12 --------------------------------------------------------------------------------------------------
def background_mse(images: torch.Tensor, originals: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 12 per image: the MSE over channels of each background pixel (mask < 0.5), averaged over them.
    Images (N, 3, H, W) in [0, 1]; mask (N, 1, H, W), 1 = key region. (N,); 0 where there is no background."""
    bg = (pixel_mask < 0.5).to(images.dtype)
    per_pixel = ((images - originals) ** 2).mean(dim=1, keepdim=True)
    return (per_pixel * bg).flatten(1).sum(1) / bg.flatten(1).sum(1).clamp_min(1)


# -- the decoder D and its tuned copy D* -----------------------------------------------------------------------
class LatentDecoder(torch.nn.Module):
    """D: latents × scaling → images in [−1, 1] (not clamped): post_quant_conv then the VAE decoder, as
    ``AutoencoderKL.decode``. ``tuned=True`` holds deep copies with trainable weights (θ_D of Alg. 2), so the
    loaded model is never modified; ``tuned=False`` wraps the loaded, frozen modules themselves."""

    def __init__(self, vae, scaling: float, tuned: bool) -> None:
        super().__init__()
        pq, dec = getattr(vae, "post_quant_conv", None), vae.decoder
        if tuned:
            pq, dec = copy.deepcopy(pq), copy.deepcopy(dec)
        self.post_quant_conv = pq
        self.decoder = dec
        self.scaling = float(scaling)
        self.dtype = next(vae.parameters()).dtype
        self.tuned = tuned
        self.requires_grad_(tuned)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = (z / self.scaling).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()


class StackedDecoders(torch.nn.Module):
    """D*_1 … D*_N: one trainable copy of the decoder per image, stored as stacked weights and run with
    ``torch.func.vmap``, so image i is always decoded by copy i while the batch runs as one call. Adam is
    element-wise, so optimising the stack equals optimising each copy alone."""

    def __init__(self, vae, scaling: float, n: int) -> None:
        super().__init__()
        one = LatentDecoder(vae, scaling, tuned=True)
        self.params = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.ndim)).requires_grad_(True)
                       for k, v in one.named_parameters()}
        self.buffers_ = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.ndim)) for k, v in one.named_buffers()}
        self.base = one.to("meta")  # the architecture only; the weights live in the stacks
        self.n = n

    def trainable(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def freeze(self) -> None:
        self.params = {k: v.detach() for k, v in self.params.items()}

    def forward(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Decode z (M, C, h, w) with the copies ``rows`` (default: all N, M = N)."""
        import warnings

        from torch.func import functional_call, vmap

        p, b = self.params, self.buffers_
        if rows is not None:
            rows = rows.to(next(iter(p.values())).device)
            p = {k: v[rows] for k, v in p.items()}
            b = {k: v[rows] for k, v in b.items()}

        def one(params, buffers, zi):
            return functional_call(self.base, (params, buffers), (zi[None],))[0]

        with warnings.catch_warnings(), attention_for_gradients(z.device):
            # attention layers fall back to a per-image loop under vmap on some builds (a performance note only)
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return vmap(one)(p, b, z)


class SharedDecoder(torch.nn.Module):
    """The loaded decoder for every image (Alg. 2 off): same call signature as :class:`StackedDecoders`."""

    def __init__(self, vae, scaling: float) -> None:
        super().__init__()
        self.decoder = LatentDecoder(vae, scaling, tuned=False)

    def forward(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z)


def gray_rows(images: torch.Tensor, tol: float = 1 / 255) -> torch.Tensor:
    """(N,) bool: the images (N, C, H, W) whose channels are equal at every pixel (within ``tol``, one 8-bit level by
    default), i.e. grayscale images stored as RGB."""
    if images.shape[1] < 2:
        return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    return (images.amax(1) - images.amin(1)).flatten(1).amax(1) <= tol


def project_gray(images: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """The rows ``gray`` (M,) bool of images (M, C, H, W) projected onto the grey axis (every channel = the channel
    mean: the orthogonal projection onto span(1, …, 1), the colour subspace of a grayscale input); the other rows
    unchanged. Linear, so gradients pass through it."""
    g = gray.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(g, images.mean(1, keepdim=True).expand_as(images), images)


class GrayDecoders(torch.nn.Module):
    """Decoders (:class:`StackedDecoders` or :class:`SharedDecoder`) whose output is projected onto the grey axis
    for the images ``gray`` (N,) bool (``keep_gray``); same call signature."""

    def __init__(self, decoders: torch.nn.Module, gray: torch.Tensor) -> None:
        super().__init__()
        self.decoders = decoders
        self.gray = gray

    def forward(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out = self.decoders(z, rows)
        return project_gray(out, self.gray if rows is None else self.gray.to(rows.device)[rows])


@dataclass
class Background:
    """What Alg. 2 returns for a batch, plus each image's loss at the first and the last iteration."""

    z_bg: torch.Tensor  # (N, C, h, w)
    decoders: StackedDecoders
    loss_first: list[float]
    loss_last: list[float]


def preserve_background(vae, scaling: float, images: torch.Tensor, z_f: torch.Tensor, latent_mask: torch.Tensor,
                        pixel_mask: torch.Tensor, alpha0: float, iterations: int, lr_latent: float,
                        lr_decoder: float, noise: BatchNoise, gray: torch.Tensor | None = None,
                        amp: GradPrecision = FP32) -> Background:
    """Alg. 2 for a batch, each image with its own decoder copy and its own noise. ``images`` (N, 3, R, R) in
    [0, 1] at the model's resolution, ``z_f`` = E(images) (N, C, h, w), ``latent_mask`` M' (N, 1, h, w),
    ``pixel_mask`` M (N, 1, R, R) (1 = key region).

    Each iteration draws a fresh ε from ``noise`` (the batch's draws), blends z_init = z^F⊙M' + z^bg⊙(1−M'),
    noises it to α_0 and decodes with the copied decoder; one Adam (two parameter groups: z^bg and θ_D) minimises
    the background MSE (eq. 12). ``gray`` (N,) bool: the images whose decoded output is projected onto the grey axis
    (``keep_gray``), in the loss as in Alg. 3, so the copy is tuned for the output the method returns. ``amp``: the
    decoding under ``--precision`` (autocast, and loss scaling for fp16; the weights and Adam stay fp32)."""
    decoders = StackedDecoders(vae, scaling, len(images))
    decode = decoders if gray is None else GrayDecoders(decoders, gray)
    z_bg = z_f.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [z_bg], "lr": lr_latent},
                            {"params": decoders.trainable(), "lr": lr_decoder}])
    m = latent_mask.to(z_f.dtype)
    first = last = [float("nan")] * len(images)
    scaler = amp.scaler()
    with torch.enable_grad():
        for i in range(iterations):
            eps = noise.randn(range(len(images)), tuple(z_f.shape[1:]), "background_q_sample", (i,))
            z_init = z_f * m + z_bg * (1 - m)
            with amp.autocast():
                out = (decode(q_sample_at(z_init, alpha0, eps)).float() + 1) / 2
            per_image = background_mse(out, images, pixel_mask)
            opt.zero_grad(set_to_none=True)
            # a sum: each image's weights get only their own image's gradient
            scaler.scale(per_image.sum()).backward()
            scaler.step(opt)
            scaler.update()
            last = per_image.detach().cpu().tolist()
            if i == 0:
                first = last
    decoders.freeze()
    return Background(z_bg=z_bg.detach(), decoders=decoders, loss_first=first, loss_last=last)


# -- Alg. 3: blended latent diffusion ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One DDIM step t → t_prev of the blended chain."""

    t: int  # the UNet's timestep
    ab_t: float  # ᾱ_t
    ab_prev: float  # ᾱ of the level the step lands on
    ab_bg: float  # level the background latent is noised to for the blend after this step


def chain_levels(alphas_cumprod: torch.Tensor, final_alpha_cumprod: float, num_train: int, offset: int,
                 steps: int, tau: int) -> tuple[float, list[Level]]:
    """(ᾱ of the start level, the τ steps) of a ``steps``-step DDIM chain ("leading" spacing with
    ``offset``, as SD 1.x), entered at its τ-th level. The background is blended at the level the foreground
    reaches, and after the last step at α_0 = ᾱ[0] = 1 − β_0 (the supplement's B.4 / Alg. 2)."""
    if not 1 <= tau <= steps:
        raise UsageError(f"eced: --set tau={tau} must be between 1 and steps={steps}")
    ts = edict_timesteps(steps, num_train, offset)[:tau]
    ratio = num_train // steps
    alpha0 = float(alphas_cumprod[0])
    levels = []
    for t in reversed(ts):
        ab_prev, ab_t = step_levels(t, ratio, alphas_cumprod, final_alpha_cumprod, inverse=False, mode="exact")
        levels.append(Level(t=t, ab_t=ab_t, ab_prev=ab_prev, ab_bg=ab_prev if t - ratio >= 0 else alpha0))
    return levels[0].ab_t, levels


@dataclass
class ChainNoise:
    """The Gaussian draws of one pass of the chain for a batch: z_τ's ε, and per step the DDIM σ-noise and
    the background's noise."""

    start: torch.Tensor  # (N, C, h, w)
    step: list[torch.Tensor]  # τ × (N, C, h, w)
    background: list[torch.Tensor]  # τ × (N, C, h, w)


def draw_noise(noise: BatchNoise, rows: list[int], shape: tuple[int, ...], n_steps: int,
               iteration: int | None = None) -> ChainNoise:
    """The draws of one pass of the chain for the images ``rows`` (of attack iteration ``iteration``; None: the
    one set reused by every iteration, noise=fixed): z_τ's, then each step's DDIM noise, then each step's
    background noise."""
    at = () if iteration is None else (iteration,)
    start = noise.randn(rows, shape, "chain_start", at)
    step = [noise.randn(rows, shape, "chain_step", (*at, k)) for k in range(n_steps)]
    background = [noise.randn(rows, shape, "chain_background", (*at, k)) for k in range(n_steps)]
    return ChainNoise(start=start, step=step, background=background)


def blended_chain(unet_eps, z_init: torch.Tensor, z_bg: torch.Tensor, latent_mask: torch.Tensor,
                  cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float, start_ab: float,
                  levels: list[Level], eta: float, noise: ChainNoise, checkpoint: bool = False) -> torch.Tensor:
    """Alg. 3 lines 6–11: z_τ = noise(z_init, τ); for each step z^fg = DDIM(z_t, C^CF) (eq. 10, σ from η),
    z_t = z^fg⊙M' + noise(z^bg*, t)⊙(1−M'). Returns z_0, differentiable w.r.t. ``z_init``."""
    from torch.utils.checkpoint import checkpoint as ckpt

    m = latent_mask.to(z_init.dtype)
    z = q_sample_at(z_init, start_ab, noise.start)

    guided = guided_eps_fn(unet_eps, cond, uncond, guidance) if uncond is not None and guidance != 1.0 else None

    def step(z_t, step_noise, bg_noise, level: Level):
        eps = guided(z_t, level.t) if guided is not None else unet_eps(z_t, level.t, cond)
        ab_t = torch.tensor(level.ab_t, dtype=z_t.dtype, device=z_t.device)
        ab_prev = torch.tensor(level.ab_prev, dtype=z_t.dtype, device=z_t.device)
        x0 = tweedie_x0(z_t, eps, ab_t)
        z_fg = ddim_step_from_alphas(x0, eps, ab_t, ab_prev, eta=eta, noise=step_noise)
        return z_fg * m + q_sample_at(z_bg, level.ab_bg, bg_noise) * (1 - m)

    for k, level in enumerate(levels):
        if checkpoint and torch.is_grad_enabled():
            z = ckpt(step, z, noise.step[k], noise.background[k], level, use_reentrant=False)
        else:
            z = step(z, noise.step[k], noise.background[k], level)
    return z


def straight_through_unit(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] decoder output → [0, 1], clamped in the forward pass, identity in the backward pass (a
    saturated pixel still receives the classifier's gradient)."""
    x = (images + 1) / 2
    return x + (x.clamp(0, 1) - x).detach()


def attention_for_gradients(device: object):
    """The SDPA kernels the vmapped decoder copies may use. On an H100 (torch 2.11) their backward failed with the
    memory-efficient kernel ("LSE is not correctly aligned (strideB)", the demo, every time) and with the default set
    once at SD size ("unable to find an engine"); flash (fp16/bf16) and math always worked. The UNet's backward
    worked with every kernel set, so it keeps torch's default choice. `bench/eced_sdpa_check.py` re-checks this
    (bench/results/eced_h100_run*.txt). CPU: unchanged."""
    import contextlib

    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
