"""A tiny random Stable-Diffusion-shaped folder for plumbing tests: the time-edict fixture's UNet, VAE and
scheduler (ε- or v-prediction) plus a random 2-layer CLIP text encoder (hidden 32) and a character-level CLIP
tokenizer."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path


def build_tiny_sd(fixture: Path, out: Path, max_length: int = 32, prediction_type: str = "epsilon") -> Path:
    """``prediction_type="v_prediction"`` gives the SD 2.x (768-v) layout: the same folders, the scheduler
    saying its UNet predicts v (random weights, so it predicts nothing in particular either way)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(fixture / sub, out / sub)
    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": prediction_type}, indent=2))
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    # no merges: every word is spelled letter by letter (enough for plumbing)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                  model_max_length=max_length).save_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(out / "text_encoder")
    return out
