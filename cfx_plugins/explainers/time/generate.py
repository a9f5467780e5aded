"""TIME's counterfactual step (thesis §5.3.3): encode → EDICT inversion (positive = source prompt,
negative = target prompt) → EDICT denoising with the roles swapped → decode; batched over images."""

from __future__ import annotations

from typing import Any

from cfx_cli.diffusion.edict import edict_denoise, edict_invert, edict_timesteps
from cfx_cli.diffusion.guidance import guided_eps_fn
from cfx_cli.errors import CfxError, UsageError
from cfx_cli.images import resize_images

from .schedule import GUIDANCE_CONVENTIONS, guidance_scale, parse_schedule  # noqa: F401 - re-exported


class TimeGenerator:
    """The frozen model with fitted tokens installed; prompt embeddings are computed once per class."""

    def __init__(self, model, meta: dict[str, Any]) -> None:
        self.model = model
        self.meta = meta
        self.labels = list(meta["labels"])
        tokens = meta["tokens"]
        self.context = " ".join(tokens["context"])
        self.class_tokens = dict(tokens["classes"])
        self._embeds: dict[int, Any] = {}

    def prompt(self, k: int) -> str:
        label = self.labels[k]
        if label not in self.class_tokens:
            raise CfxError(f"the TIME tokens have no class tokens for {label!r} (no training image was "
                           "predicted as it when they were fitted)")
        return self.meta["prompts"]["class"].format(context=self.context,
                                                   **{"class": " ".join(self.class_tokens[label])})

    def class_embeds(self, classes) -> Any:
        import torch

        missing = sorted({int(k) for k in classes} - set(self._embeds))
        if missing:
            with torch.no_grad():
                out = self.model.encode_prompts([self.prompt(k) for k in missing])
            self._embeds.update({k: out[i: i + 1] for i, k in enumerate(missing)})
        return torch.cat([self._embeds[int(k)] for k in classes])

    def encode(self, images):
        """(N, 3, H, W) in [0, 1] → latents of the model's resolution."""
        import torch

        r = self.model.resolution
        x = resize_images(images.to(self.model.device, torch.float32), (r, r))
        with torch.no_grad():
            return self.model.encode_images(x)

    def invert(self, latents, sources, targets, tau: int, g: float, steps: int, p: float, mode: str):
        """EDICT inversion of the first τ of ``steps`` timesteps (positive = source prompt, negative = target
        prompt, guidance scale ``g``) → the noised (x, y) streams."""
        import torch

        m = self.model
        if not 1 <= tau <= steps:
            raise UsageError(f"schedule step τ={tau} must be between 1 and steps={steps}")
        ts = edict_timesteps(steps, m.num_train_timesteps, m.steps_offset)[:tau]
        src, tgt = self.class_embeds(sources.tolist()), self.class_embeds(targets.tolist())
        with torch.no_grad():
            z = latents.to(m.device)
            return edict_invert(z.clone(), z.clone(), guided_eps_fn(m.unet_eps, src, tgt, g), ts,
                                m.num_train_timesteps // steps, m.alphas_cumprod, m.final_alpha_cumprod, p,
                                mode=mode)

    def denoise(self, x, y, sources, targets, tau: int, g: float, steps: int, p: float):
        """EDICT denoising of (x, y) over the same τ timesteps with the roles swapped (positive = target
        prompt, negative = source) → the x stream decoded, in [0, 1] at the model's resolution."""
        import torch

        m = self.model
        ts = edict_timesteps(steps, m.num_train_timesteps, m.steps_offset)[:tau]
        src, tgt = self.class_embeds(sources.tolist()), self.class_embeds(targets.tolist())
        with torch.no_grad():
            x, _ = edict_denoise(x, y, guided_eps_fn(m.unet_eps, tgt, src, g), ts, m.num_train_timesteps // steps,
                                 m.alphas_cumprod, m.final_alpha_cumprod, p)
            return m.decode_latents(x).float()

    def counterfactuals(self, latents, sources, targets, tau: int, g: float, steps: int, p: float,
                        mode: str, out_size: tuple[int, int]):
        """One (τ, g) attempt for a batch (``g``: the guidance scale itself, see :func:`guidance_scale`);
        returns images (N, 3, *out_size) in [0, 1] on the CPU."""
        x, y = self.invert(latents, sources, targets, tau, g, steps, p, mode)
        img = self.denoise(x, y, sources, targets, tau, g, steps, p)
        return resize_images(img, out_size).clamp(0, 1).cpu()
