"""A tiny random Stable-Diffusion-shaped folder for plumbing tests: the time-edict fixture's UNet, VAE and
scheduler plus a random 2-layer CLIP text encoder (hidden 32) and a word-level tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

WORDS = ["a", "picture", "with", "photo", "digit", "image"]


def build_tiny_sd(fixture: Path, out: Path, max_length: int = 16) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(fixture / sub, out / sub)
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)
    tok.save_pretrained(out / "tokenizer")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    CLIPTextModel(cfg).save_pretrained(out / "text_encoder")
    return out
