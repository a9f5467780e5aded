"""Tiny stand-ins for real checkpoints, built in a temporary folder (shared by the model-layer tests)."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

WORDS = ("a", "digit", "photo", "of", "zero", "three", "eight")


def tiny_tokenizer_files(folder: Path, max_length: int = 8) -> None:
    """A character-level CLIP BPE vocabulary (no merges): enough for CLIPTokenizer to load and tokenise."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "<>_":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"})
    )


def tiny_text_encoder(vocab_size: int, hidden: int = 32, max_length: int = 8, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def tiny_tokenizer_and_encoder(folder: Path):
    from transformers import CLIPTokenizer

    tiny_tokenizer_files(folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    return tok, tiny_text_encoder(len(tok))


def make_sd_folder(fixture: Path, dest: Path) -> Path:
    """A Stable-Diffusion-layout folder: the fixture's unet/vae/scheduler plus a tiny text encoder/tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    for comp in ("unet", "vae", "scheduler"):
        shutil.copytree(fixture / comp, dest / comp)
    tok, enc = tiny_tokenizer_and_encoder(dest)
    enc.save_pretrained(str(dest / "text_encoder"))
    tok.save_pretrained(str(dest / "tokenizer"))
    (dest / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.16.1",
                "vae": ["diffusers", "AutoencoderKL"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return dest


def tiny_unet2d(seed: int = 0, learned_variance: bool = False):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=6 if learned_variance else 3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


TINY_ADM_FLAGS = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "16",
    "num_heads": 2,
    "num_head_channels": -1,
    "learn_sigma": False,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}
