"""The latent text-to-image model TIME works with: VAE, UNet, text encoder, tokenizer and DDIM schedule.

Loading goes through ``cfx_cli.models`` (``--model diffusers:PATH_OR_HUB_ID`` for Stable Diffusion 1.x
layouts, ``--model demo:NAME`` for the embedded demo generator); this module only adapts the loaded
components to what TIME needs (levels of the noise schedule, prompt encoding, image ↔ latent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.quiet import quiet_loaded_libraries

DEFAULT_MODEL = "demo:latent"  # the embedded latent text-to-image model trained on the demo digits


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
    #: forward-only calls on the ``--backend`` (``cfx_cli.backends.latent.LatentForward``); None = the modules
    forward: Any = None

    def use_backend(self, context) -> str:
        """Route the forward-only calls (UNet ε, VAE encode/decode) through ``context``'s backend choice;
        returns the backend's description for the run record."""
        from cfx_cli.backends.latent import latent_forward

        side = self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = int(self.unet.config.in_channels)
        seq = int(self.tokenizer.model_max_length)
        fwd = latent_forward(context, self.unet, self.vae, (channels, side, side), (seq, self.embedding_dim),
                             label=self.model_id)
        self.forward = None if fwd.direct else fwd
        return fwd.describe()

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def unet_eps(self, z, t, embeds):
        """ε prediction in float32 at timestep ``t`` (an int, or a (N,) tensor)."""
        import torch

        if isinstance(t, int):
            t = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if self.forward is not None and not torch.is_grad_enabled():  # gradients (token fitting) stay in torch
            return self.forward.unet(z.float(), t.float(), embeds.float()).float()
        return self.unet(z.to(self.dtype), t, encoder_hidden_states=embeds.to(self.dtype)).sample.float()

    def encode_images(self, images, *, sample: bool = False, generator=None):
        """Images (N, 3, R, R) in [0, 1] → latents × scaling (posterior mean, or a sample), float32."""
        import torch

        if self.forward is not None and not sample and not torch.is_grad_enabled():
            return self.forward.encode((images * 2 - 1).to(self.device).float()).float() * self.scaling_factor
        dist = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z.float() * self.scaling_factor

    def decode_latents(self, z):
        """Latents × scaling → images in [0, 1], float32."""
        import torch

        if self.forward is not None and not torch.is_grad_enabled():
            img = self.forward.decode((z / self.scaling_factor).float()).float()
        else:
            img = self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample.float()
        return (img.clamp(-1, 1) + 1) / 2

    def encode_prompts(self, prompts: list[str]):
        """Prompts padded to the tokenizer's length → last hidden states (N, L, D)."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def tokenize(self, prompts: list[str]):
        tok = self.tokenizer
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=False,
                  return_tensors="pt")
        ids = enc.input_ids
        if ids.shape[1] > tok.model_max_length:
            raise UsageError(f"a prompt ({prompts[0]!r}) is longer than the text encoder's "
                             f"{tok.model_max_length} tokens; use shorter prompt templates "
                             "(--set context_prompt=... class_prompt=...)")
        return ids.to(self.device)


def load_latent_t2i(spec: str | None, device: str = "cpu") -> LatentT2I:
    from cfx_cli.models.spec import load_model

    spec = spec or DEFAULT_MODEL
    _quiet_libraries()
    loaded = load_model(spec, device=device)
    parts = {}
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        value = loaded.get(name) if isinstance(loaded, dict) else getattr(loaded, name, None)
        if value is None:
            raise UsageError(f"--model {spec}: TIME needs a latent text-to-image model (VAE, UNet, text "
                             f"encoder, tokenizer, scheduler); this one has no {name}")
        parts[name] = value
    return assemble(**parts, model_id=spec, device=device)


def _quiet_libraries() -> None:
    # diffusers/transformers print loading bars and accelerate hints; cfx reports its own progress
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    quiet_loaded_libraries()


def assemble(vae, unet, text_encoder, tokenizer, scheduler, model_id: str, device: str) -> LatentT2I:
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
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM schedulers
        final = float(scheduler.final_alpha_cumprod)
    else:  # e.g. a DDPM config: SD 1.x's convention (set_alpha_to_one false) unless the config says otherwise
        final = 1.0 if getattr(cfg, "set_alpha_to_one", False) else float(alphas[0])
    return LatentT2I(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                     alphas_cumprod=alphas,
                     final_alpha_cumprod=final, num_train_timesteps=int(cfg.num_train_timesteps),
                     steps_offset=int(getattr(cfg, "steps_offset", 0)), model_id=model_id,
                     resolution=side, device=device)
