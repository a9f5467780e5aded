"""``cfx accelerate MODEL``: build the accelerated UNet of a pixel diffusion model ahead of time, run the parity
gate, and leave the validated build in the cache where ``--backend auto`` finds it."""

from __future__ import annotations

import sys
import time

from cfx_cli.backends import onnx_backend
from cfx_cli.backends.base import BackendError
from cfx_cli.backends.latent import decoder_module, encoder_module, unet_module
from cfx_cli.backends.pixel import net_module
from cfx_cli.devices import resolve_device
from cfx_cli.errors import CfxError, UsageError
from cfx_cli.models import load_model


def accelerate_model(spec: str, backend: str, precision: str, device: str, size: int | None,
                     model_flags: str | None, trust_pickle: bool) -> str:
    import torch

    dev = resolve_device(device)
    model = load_model(spec, model_flags, dev, trust_pickle, expect=("pixel", "latent"), method="cfx accelerate")
    if model.kind == "latent":
        return _accelerate_latent(spec, vars(model), backend, precision, dev, size)
    side = size or getattr(model, "image_size", None)
    if not isinstance(side, int):
        raise UsageError(f"--model {spec}: cannot tell the image size; pass --size")
    cfg = getattr(model.net, "config", None)
    channels = int(getattr(cfg, "in_channels", 0) or getattr(getattr(model, "flags", None), "in_channels", 0) or 3)
    dtype = getattr(model, "dtype", None) or torch.float32
    example = (torch.zeros((1, channels, side, side), dtype=dtype, device=dev),
               torch.zeros((1,), dtype=torch.float32, device=dev))
    t0 = time.monotonic()
    try:
        built = onnx_backend.build(net_module(model).eval(), example, backend, precision, dev,
                                   notice=lambda m: print(m, file=sys.stderr), label=spec)
    except BackendError as exc:
        raise CfxError(f"accelerate {spec}: --backend {backend} refused: {exc}") from None
    state = "cached build reused" if built.cache_hit else "built"
    return (f"{spec}: {built.name} {state} in {time.monotonic() - t0:.1f}s; parity {built.parity_error:.2g} "
            f"(max relative error vs torch fp32) at {channels}×{side}×{side}, dynamic batch → {built.path}")


def _accelerate_latent(spec: str, parts: dict, backend: str, precision: str, dev: str, size: int | None) -> str:
    """A latent text-to-image model (TIME, ECED): the UNet and the VAE decoder and encoder, each built and gated."""
    import torch

    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    for m in (unet, vae, text_encoder):
        m.eval().to(dev)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = unet.config.sample_size
    side = (size or int(sample if isinstance(sample, int) else sample[0]) * down) // down
    seq = int(getattr(parts.get("tokenizer"), "model_max_length", 0) or text_encoder.config.max_position_embeddings)
    dim = int(text_encoder.get_input_embeddings().weight.shape[1])
    z = torch.zeros((1, int(unet.config.in_channels), side, side), device=dev)
    jobs = [("unet", unet_module(unet), (z, torch.zeros((1,), device=dev), torch.zeros((1, seq, dim), device=dev))),
            ("vae decoder", decoder_module(vae), (torch.zeros((1, int(vae.config.latent_channels), side, side),
                                                              device=dev),)),
            ("vae encoder", encoder_module(vae), (torch.zeros((1, int(vae.config.in_channels), side * down,
                                                               side * down), device=dev),))]
    lines = []
    for name, module, example in jobs:
        t0 = time.monotonic()
        try:
            built = onnx_backend.build(module, example, backend, precision, dev,
                                       notice=lambda m: print(m, file=sys.stderr), label=f"{spec} {name}")
        except BackendError as exc:
            raise CfxError(f"accelerate {spec} ({name}): --backend {backend} refused: {exc}") from None
        state = "cached build reused" if built.cache_hit else "built"
        lines.append(f"{spec} {name}: {built.name} {state} in {time.monotonic() - t0:.1f}s; parity "
                     f"{built.parity_error:.2g} (max relative error vs torch fp32), dynamic batch → {built.path}")
    return "\n".join(lines)
