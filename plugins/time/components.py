"""The latent text-to-image model TIME works with: VAE, UNet, text encoder, tokenizer and DDIM schedule.

``--model diffusers:PATH_OR_HUB_ID`` (a Stable Diffusion 1.x layout: ``vae/ unet/ text_encoder/ tokenizer/
scheduler/``) or ``--model demo:NAME`` (the embedded demo generator). The model loaders of ``cfx_cli.models``
are used when that package is installed; otherwise the folder is read here with diffusers/transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError

DEFAULT_MODEL = "demo:digits"
SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class LatentT2I:
    """Frozen components plus what TIME needs to know about them."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    alphas_cumprod: Any  # (T_train,) float32 tensor on the CPU
    final_alpha_cumprod: float
    num_train_timesteps: int
    steps_offset: int
    model_id: str
    resolution: int  # image side the VAE/UNet pair works at (latent side × VAE downsampling)
    device: str = "cpu"

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def unet_eps(self, z, t: int, embeds):
        import torch

        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        return self.unet(z, tt, encoder_hidden_states=embeds).sample

    def encode_images(self, images, *, sample: bool = False, generator=None):
        """Images (N, 3, R, R) in [0, 1] → latents × scaling (posterior mean, or a sample)."""
        dist = self.vae.encode(images * 2 - 1).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z * self.scaling_factor

    def decode_latents(self, z):
        """Latents × scaling → images in [0, 1]."""
        return (self.vae.decode(z / self.scaling_factor).sample.clamp(-1, 1) + 1) / 2

    def encode_prompts(self, prompts: list[str]):
        """Token ids padded to the tokenizer's length → last hidden states (N, L, D)."""
        ids = self.tokenize(prompts)
        return self.text_encoder(ids)[0]

    def tokenize(self, prompts: list[str]):
        tok = self.tokenizer
        enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=False,
                  return_tensors="pt")
        ids = enc.input_ids
        if ids.shape[1] > tok.model_max_length:
            raise UsageError(f"prompt {prompts[0]!r} is longer than the text encoder's {tok.model_max_length} "
                             "tokens; use a shorter prompt template (--set context_prompt/class_prompt)")
        return ids.to(self.device)


def load_latent_t2i(spec: str | None, device: str = "cpu") -> LatentT2I:
    spec = spec or DEFAULT_MODEL
    _quiet_libraries()
    if spec.startswith("demo:"):
        return _load_demo(spec, device)
    if spec.startswith("diffusers:"):
        return _load_diffusers(spec.split(":", 1)[1], spec, device)
    raise UsageError(f"--model {spec}: TIME needs a latent text-to-image model: diffusers:PATH_OR_HUB_ID "
                     f"(Stable Diffusion 1.x layout) or demo:NAME")


def _quiet_libraries() -> None:
    # diffusers/transformers print loading bars and accelerate hints; cfx reports its own progress
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load_demo(spec: str, device: str) -> LatentT2I:
    try:
        from cfx_cli.demo import generators
    except ImportError:
        raise UsageError(f"--model {spec}: the demo text-to-image model is not installed in this build") from None
    loader = getattr(generators, "load_text_to_image", None) or getattr(generators, "load_latent_t2i", None)
    if loader is None:
        raise UsageError(f"--model {spec}: this build's demo generators provide no text-to-image model")
    parts = loader(spec.split(":", 1)[1], device=device)
    return _from_parts(parts, spec, device)


def _from_parts(parts: Any, model_id: str, device: str) -> LatentT2I:
    get = (lambda k: parts[k]) if isinstance(parts, dict) else (lambda k: getattr(parts, k))
    return _assemble(get("vae"), get("unet"), get("text_encoder"), get("tokenizer"), get("scheduler"),
                     model_id, device)


def _load_diffusers(where: str, spec: str, device: str) -> LatentT2I:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(where)
    if root.exists():
        missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
        if missing:
            raise UsageError(f"--model {spec}: {root} lacks {', '.join(missing)}/ (expected a Stable Diffusion "
                             "folder with vae/ unet/ text_encoder/ tokenizer/ scheduler/)")
    try:
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(where, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {spec}: cannot load ({first})") from None
    return _assemble(vae, unet, text_encoder, tokenizer, scheduler, spec, device)


def _assemble(vae, unet, text_encoder, tokenizer, scheduler, model_id: str, device: str) -> LatentT2I:
    import torch

    for m in (vae, unet, text_encoder):
        m.eval().to(device)
        m.requires_grad_(False)
    cfg = scheduler.config
    if getattr(cfg, "prediction_type", "epsilon") != "epsilon":
        raise UsageError(f"--model {model_id}: TIME needs an ε-prediction model "
                         f"(scheduler prediction_type is {cfg.prediction_type!r})")
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = unet.config.sample_size
    side = int(sample if isinstance(sample, int) else sample[0]) * down
    alphas = scheduler.alphas_cumprod.detach().float().cpu()
    final = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
    return LatentT2I(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, alphas_cumprod=alphas,
                     final_alpha_cumprod=final, num_train_timesteps=int(cfg.num_train_timesteps),
                     steps_offset=int(getattr(cfg, "steps_offset", 0)), model_id=model_id,
                     resolution=side, device=device)
