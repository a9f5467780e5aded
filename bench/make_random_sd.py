"""Write a diffusers folder with Stable Diffusion 1.x's shapes and random weights, for timing and plumbing runs
where no real checkpoint can be downloaded (`--model diffusers:OUT` then loads it like a real SD 1.x folder).

    python bench/make_random_sd.py OUT [--seed 0] [--prediction-type v_prediction] [--narrow]

UNet: bench/unet_backends.py's SD-1.x UNet (860M parameters, cross-attention 768). VAE: bench/time_sd_backends.py's
AutoencoderKL 128/256/512/512. Text encoder: CLIP ViT-L/14's text tower shape (12 layers, width 768, 77
positions) with random weights over a character-level vocabulary (every word spelled letter by letter, which is
enough for timing). Scheduler: SD 1.x's DDIM configuration (scaled-linear β 0.00085–0.012, steps_offset 1), ε- or
(``--prediction-type v_prediction``, SD 2.x's layout) v-prediction.
``--narrow`` keeps that layout at 512² (VAE: 4 blocks, 3 down-samplings to 64² × 4 latents, sample size 512;
UNet: 3 cross-attention levels + 1 plain, 2 layers per block, self-attention over all 64² latent positions; text
encoder: CLIP's causal layout with 77 positions) at widths a CPU runs in seconds: UNet 32/64/64/64 with one
attention head (SD: 8; attention over 4096 positions costs per head), VAE 16/16/32/32 (16 norm groups), text
encoder 2 layers of width 64 (= the cross-attention width). The recipes' slow tests (docs/reproduce.md) use it.
Nothing it generates means anything: use it for speed and memory, never for quality.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path


def build(out: Path, seed: int = 0, prediction_type: str = "epsilon", narrow: bool = False) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from time_sd_backends import sd1_vae
    from unet_backends import sd1_unet

    out.mkdir(parents=True, exist_ok=True)
    width = 64 if narrow else 768  # the text encoder's width = the UNet's cross-attention width
    if narrow:
        torch.manual_seed(seed)
        UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=width, attention_head_dim=1, norm_num_groups=16,
        ).save_pretrained(out / "unet")
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(16, 16, 32, 32), norm_num_groups=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ).save_pretrained(out / "vae")
    else:
        sd1_unet(seed).save_pretrained(out / "unet")
        sd1_vae(seed).save_pretrained(out / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type).save_pretrained(out / "scheduler")
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    tok.save_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=2 if narrow else 12, num_attention_heads=2 if narrow else 12,
                         max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(out / "text_encoder")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction"),
                    help="v_prediction: the SD 2.x (768-v) scheduler layout")
    ap.add_argument("--narrow", action="store_true", help="SD 1.x's layout at 512², narrow widths (CPU tests)")
    args = ap.parse_args(argv)
    print(build(Path(args.out), args.seed, args.prediction_type, args.narrow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
