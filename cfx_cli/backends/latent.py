"""Backends for latent text-to-image models (TIME's UNet2DConditionModel and AutoencoderKL): the three
forward-only calls as tensor-in/tensor-out modules, and :class:`LatentForward`, which runs them on the backend
chosen by ``--backend`` (gradient paths such as token fitting keep calling the torch modules directly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfx_cli.backends.base import ForwardBackend
from cfx_cli.backends.select import forward_backend


def unet_module(unet: Any):
    """(latents, timesteps, text embeddings) → ε, as a plain module (diffusers returns ``.sample``)."""
    import torch

    class CondUNet(torch.nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, z, t, text):
            return self.net(z, t, encoder_hidden_states=text).sample

    return CondUNet(unet).eval()


def decoder_module(vae: Any):
    """Unscaled latents → images in [-1, 1] (unclamped): ``vae.decode(z).sample``."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self, vae) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    return Decoder(vae).eval()


def encoder_module(vae: Any):
    """Images in [-1, 1] → the posterior mean of the unscaled latents (what TIME encodes with)."""
    import torch

    class EncoderMean(torch.nn.Module):
        def __init__(self, vae) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return self.vae.encode(x).latent_dist.mean

    return EncoderMean(vae).eval()


@dataclass
class LatentForward:
    """The forward-only calls of a latent model on their backends. ``direct`` is true when every call would be
    plain fp32 torch: callers then use the model's own modules, bit-identical to having no backend at all."""

    unet: ForwardBackend
    decode: ForwardBackend
    encode: ForwardBackend

    @property
    def direct(self) -> bool:
        return all(b.name == "torch (fp32)" for b in (self.unet, self.decode, self.encode))

    def describe(self) -> str:
        names = {b.name for b in (self.unet, self.decode, self.encode)}
        if len(names) == 1:
            return names.pop()
        return f"unet {self.unet.name}, vae decoder {self.decode.name}, vae encoder {self.encode.name}"


def latent_forward(context: Any, unet: Any, vae: Any, latent_shape: tuple[int, int, int],
                   text_shape: tuple[int, int], label: str = "model") -> LatentForward:
    """Backends for ``unet`` at latents of ``latent_shape`` (C, h, w) with text embeddings of ``text_shape``
    (L, D), and for ``vae``'s decoder and encoder at the matching image size; chosen from ``context.options``
    like every other forward-only call (:func:`cfx_cli.backends.forward_backend`)."""
    import torch

    device = getattr(context, "device", "cpu")
    c, h, w = latent_shape
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    img_c = int(getattr(vae.config, "in_channels", 3))
    z = torch.zeros((1, c, h, w), device=device)
    return LatentForward(
        unet=forward_backend(context, _module(unet, unet_module),
                             (z, torch.zeros((1,), device=device), torch.zeros((1, *text_shape), device=device)),
                             label=f"{label} unet"),
        decode=forward_backend(context, _module(vae, decoder_module), (z,), label=f"{label} vae decoder"),
        encode=forward_backend(context, _module(vae, encoder_module),
                               (torch.zeros((1, img_c, h * down, w * down), device=device),),
                               label=f"{label} vae encoder"),
    )


_WRAPPED: dict[tuple[int, Any], Any] = {}


def _module(net: Any, wrap):
    # one wrapper per network, so that forward_backend's per-module cache (keyed by id) hits across batches
    key = (id(net), wrap)
    if key not in _WRAPPED:
        _WRAPPED[key] = wrap(net)
    return _WRAPPED[key]
