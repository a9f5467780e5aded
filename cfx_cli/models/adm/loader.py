"""Build an ADM UNet from flags and load a released checkpoint into it."""

from __future__ import annotations

import functools
from pathlib import Path

from cfx_cli.checkpoints import extract_state_dict, load_into, read_checkpoint
from cfx_cli.diffusion.gaussian import GaussianDiffusion
from cfx_cli.models.adm.flags import ADMFlags, load_flags
from cfx_cli.models.memory import MemoryOptions, apply_to_adm, resolve_dtype
from cfx_cli.models.pixel import PixelModel


def build_unet(flags: ADMFlags):
    """The network guided-diffusion's ``create_model`` builds from these flags (random weights)."""
    from cfx_cli.models.adm.unet import ADMUNet

    return ADMUNet(
        image_size=flags.image_size,
        in_channels=flags.in_channels,
        model_channels=flags.num_channels,
        out_channels=flags.out_channels,
        num_res_blocks=flags.num_res_blocks,
        attention_resolutions=flags.attention_ds(),
        dropout=flags.dropout,
        channel_mult=flags.channel_mult_tuple(),
        num_classes=flags.num_classes if flags.class_cond else None,
        use_checkpoint=flags.use_checkpoint,
        num_heads=flags.num_heads,
        num_head_channels=flags.num_head_channels,
        num_heads_upsample=flags.num_heads_upsample,
        use_scale_shift_norm=flags.use_scale_shift_norm,
        resblock_updown=flags.resblock_updown,
        use_new_attention_order=flags.use_new_attention_order,
    )


def build_diffusion(flags: ADMFlags, respacing: str | None = None) -> GaussianDiffusion:
    """The noise schedule the flags describe (``respacing`` overrides ``--timestep_respacing``)."""
    return GaussianDiffusion.from_config(
        num_steps=flags.diffusion_steps,
        schedule=flags.noise_schedule,
        respacing=flags.timestep_respacing if respacing is None else respacing,
        learn_sigma=flags.learn_sigma,
        rescale_timesteps=flags.rescale_timesteps,
        predict_xstart=flags.predict_xstart,
    )


def load_adm(
    path: str | Path,
    flags: str | dict | ADMFlags | None,
    device: str = "cpu",
    trust_pickle: bool = False,
    memory: MemoryOptions | None = None,
    state_dict: dict | None = None,
) -> PixelModel:
    """Load a guided-diffusion checkpoint (``.pt`` state dict, or ``.safetensors``) built with ``flags``.

    ``flags.use_fp16`` (or ``memory.precision``) converts the torso to half precision on GPU; on CPU the model
    computes in float32 and says so.
    """
    import torch

    flags = flags if isinstance(flags, ADMFlags) else load_flags(flags)
    memory = memory or MemoryOptions()
    if state_dict is None:
        state_dict = extract_state_dict(read_checkpoint(path, trust_pickle), path)
    net = build_unet(flags)
    load_into(net, {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, path)
    net.eval().requires_grad_(False)
    precision = memory.precision
    if flags.use_fp16 and precision == "fp32":
        precision = "fp16"
    dtype = resolve_dtype(device, precision, what=f"ADM model {path}")
    net.to(device)
    if dtype != torch.float32:
        net.convert_torso(dtype)
    apply_to_adm(net, memory)
    if flags.use_checkpoint:
        net.set_gradient_checkpointing(True)
    return PixelModel(
        net,
        build_diffusion(flags),
        flags.image_size,
        device,
        dtype,
        str(path),
        {"parameters": sum(p.numel() for p in net.parameters())},
        flags=flags,
        # respacing starts from the flags' base schedule (DiME's 500 → 200 steps: "200")
        respacer=functools.partial(build_diffusion, flags),
    )
