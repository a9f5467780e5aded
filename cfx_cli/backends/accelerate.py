"""``cfx accelerate MODEL``: build the accelerated UNet of a pixel diffusion model ahead of time, run the parity
gate, and leave the validated build in the cache where ``--backend auto`` finds it."""

from __future__ import annotations

import sys
import time

from cfx_cli.errors import CfxError, UsageError


def accelerate_model(spec: str, backend: str, precision: str, device: str, size: int | None,
                     model_flags: str | None, trust_pickle: bool) -> str:
    import torch

    from cfx_cli.backends import onnx_backend
    from cfx_cli.backends.base import BackendError
    from cfx_cli.backends.pixel import net_module
    from cfx_cli.devices import resolve_device
    from cfx_cli.models import load_model

    dev = resolve_device(device)
    model = load_model(spec, model_flags, dev, trust_pickle)
    if getattr(model, "kind", None) != "pixel":  # the demo returns a bare (unet, scheduler) holder
        from cfx_plugins.pixel_prior import as_pixel_model

        model = as_pixel_model(model, spec, "accelerate")
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
