"""Memory/precision options for large generative models: fp16/bf16 on GPU, SDPA or sliced attention,
gradient checkpointing. CPU always computes in float32 (half precision there is slow or unsupported)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from cfx_cli.backends.base import PRECISIONS
from cfx_cli.errors import UsageError

ATTENTION = ("default", "sdpa", "slicing", "math")


@dataclass
class MemoryOptions:
    precision: str = "fp32"  # fp32 | fp16 | bf16 (GPU only; CPU falls back to fp32 with a note)
    attention: str = "default"  # default | sdpa | slicing | math
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTION:
            raise UsageError(f"attention {self.attention!r}: expected one of {', '.join(ATTENTION)}")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def resolve_dtype(device: str, precision: str = "fp32", what: str = "model"):
    """torch dtype for ``precision`` on ``device``; half precision on CPU → float32, said once on stderr."""
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if not str(device).startswith("cuda"):
        note(f"{what}: {precision} requested but the device is {device}; computing in float32 on CPU")
        return torch.float32
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        note(f"{what}: this GPU has no bf16 support; using fp16")
        return torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def apply_to_diffusers(module, options: MemoryOptions) -> None:
    """Attention backend and gradient checkpointing on a diffusers model (UNet/VAE)."""
    if options.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()
    if options.attention == "sdpa" and hasattr(module, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())
    elif options.attention == "math" and hasattr(module, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor

        module.set_attn_processor(AttnProcessor())
    elif options.attention == "slicing":
        if hasattr(module, "set_attention_slice"):
            module.set_attention_slice("auto")
        elif hasattr(module, "set_attn_processor"):
            from diffusers.models.attention_processor import SlicedAttnProcessor

            module.set_attn_processor(SlicedAttnProcessor(slice_size=1))


def apply_to_adm(net, options: MemoryOptions) -> None:
    """ADM UNet: checkpointing per ResBlock/AttentionBlock; ``sdpa`` swaps the einsum attention for
    ``scaled_dot_product_attention`` (``slicing`` maps to sdpa too: PyTorch picks a memory-efficient kernel
    where the device has one)."""
    if options.gradient_checkpointing:
        net.set_gradient_checkpointing(True)
    if options.attention in ("sdpa", "slicing"):
        net.set_attention_backend("sdpa")
    elif options.attention == "math":
        net.set_attention_backend("math")


def apply_to_text_encoder(module, options: MemoryOptions) -> None:
    if options.gradient_checkpointing and hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
