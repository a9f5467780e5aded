"""Train the embedded latent text-to-image model (for TIME / ECED) on the demo digits, seeded and resumable.

    python scripts/train_demo_latent.py        # resumes from build/demo-train/ if killed

Stages: (1) an AutoencoderKL 3×16×16 ↔ 4×8×8; (2) a word-level tokenizer of our own vocabulary and a small
random CLIPTextModel, frozen; (3) a UNet2DConditionModel on the scaled latents, ε-objective, scaled-linear
betas, captions "a handwritten digit three" with 10% dropped to "" (classifier-free guidance).
Writes cfx_cli/demo/models/latent-t2i/ (a diffusers StableDiffusionPipeline-style folder: vae/, unet/,
text_encoder/, tokenizer/, scheduler/ in safetensors/JSON), model card, figures and metrics.json.
Checkpoints go to build/demo-train/latent-t2i-{vae,unet}/.
"""

from __future__ import annotations

import json
import shutil

import torch
import torch.nn.functional as F
from _demo_training import (
    EMA,
    ddpm_noised,
    folder_size_mb,
    grid_png,
    loss_curve_png,
    optimizer_step,
    setup_torch,
    step_generator,
    train_loop,
    train_with_ema,
    warmup_lr,
)

from cfx_cli.demo.data import load_split
from cfx_cli.demo.generators import (
    DIGIT_WORDS,
    LATENT_T2I_DIR,
    caption,
    classify,
    sample_latent_t2i,
)
from cfx_cli.models.latent import LatentModel

SEED = 0
VAE_STEPS = 300
VAE_BATCH = 64
VAE_LR = 1e-3
KL_WEIGHT = 1e-6
UNET_STEPS = 1000
UNET_BATCH = 64
UNET_LR = 2e-3
WARMUP = 50
EMA_DECAY = 0.995
P_EMPTY = 0.1
MAX_LEN = 8
EVAL_PER_DIGIT = 20
EVAL_STEPS = 40
EVAL_GUIDANCE = 3.0
# measured when these weights were trained (one CPU thread, 2-core machine shared with other jobs)
TIMING = ("Measured: VAE 1.2–1.4 s/step, UNet 0.86–0.96 s/step on one CPU thread of a 2-core machine\n"
          "  shared with other jobs (load average ≈ 10): about 22 minutes of training.")
WORDS = ["a", "handwritten", "digit", "number", "the", "of", "image", *DIGIT_WORDS]


def clip_bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary in which every word of ``words`` is one token.

    CLIP marks word ends with ``</w>``; the merges join each word's characters left to right, so the
    vocabulary holds the letters (alone and word-final), every prefix on the way and the whole words.
    Special tokens last, as in CLIP's vocabulary. Unknown letters map to ``<|endoftext|>`` (CLIP's unk)."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    letters = sorted({c for w in words for c in w})
    for c in letters:
        add(c)
    for c in letters:
        add(c + "</w>")
    for w in words:
        pieces = [*w[:-1], w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    return vocab, merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab(WORDS)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)
    for w in WORDS:  # the captions' words must be single tokens (textual inversion starts from them)
        ids = tok(w).input_ids
        assert len(ids) == 3, f"{w!r} tokenizes to {tok.convert_ids_to_tokens(ids)}"
    return tok, vocab, merges


def build_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 1)  # the random encoder's weights depend only on this seed
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=64,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
                         block_out_channels=(32, 64), norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=64,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)  # Stable Diffusion 1.x conventions


def train_vae(data: torch.Tensor):
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)

    def step_fn(step: int) -> float:
        g = step_generator(SEED, step)
        x = data[torch.randint(0, len(data), (VAE_BATCH,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = F.mse_loss(vae.decode(z).sample, x)
        loss = rec + KL_WEIGHT * post.kl().mean()
        optimizer_step(opt, loss, warmup_lr(step, VAE_LR, WARMUP))
        return rec.item()

    vae.train()
    losses = train_loop("latent-t2i-vae", VAE_STEPS, step_fn, vae, None, opt)
    return vae.eval(), losses


def main() -> None:
    from diffusers import StableDiffusionPipeline

    setup_torch(SEED)
    x_tr, y_tr, x_te, y_te = load_split()
    data = torch.from_numpy(x_tr) * 2 - 1
    labels = torch.from_numpy(y_tr)

    vae, vae_losses = train_vae(data)
    vae.requires_grad_(False)
    with torch.no_grad():
        post = vae.encode(data).latent_dist
        mu, std = post.mean, post.std
        scale = float(1.0 / mu.std())
        vae.register_to_config(scaling_factor=scale)
        te = torch.from_numpy(x_te)
        rec = (vae.decode(vae.encode(te * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        rec_mse = float(F.mse_loss(rec, te))
        same = float((classify(rec)[0] == classify(te)[0]).float().mean())
    print(f"VAE: test MSE {rec_mse:.5f}, label kept {same:.1%}, scaling factor {scale:.4f}", flush=True)

    tokenizer, vocab, merges = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.no_grad():
        text = LatentModel(text_encoder=text_encoder, tokenizer=tokenizer)
        ctx_digit = text.encode_prompts([caption(d) for d in range(10)])
        ctx_empty = text.encode_prompts([""])

    torch.manual_seed(SEED + 2)
    unet = build_unet()
    sched = build_scheduler()
    abar = sched.alphas_cumprod
    ema = EMA(unet, EMA_DECAY)
    opt = torch.optim.AdamW(unet.parameters(), lr=UNET_LR)

    def step_fn(step: int) -> float:
        g = step_generator(SEED + 10, step)
        idx = torch.randint(0, len(data), (UNET_BATCH,), generator=g)
        z0 = (mu[idx] + std[idx] * torch.randn(mu[idx].shape, generator=g)) * scale
        drop = torch.rand(UNET_BATCH, generator=g) < P_EMPTY
        ctx = torch.where(drop.view(-1, 1, 1), ctx_empty, ctx_digit[labels[idx]])
        zt, t, eps = ddpm_noised(z0, abar, sched.config.num_train_timesteps, g)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=ctx).sample, eps)
        optimizer_step(opt, loss, warmup_lr(step, UNET_LR, WARMUP))
        return loss.item()

    unet_losses = train_with_ema("latent-t2i-unet", UNET_STEPS, step_fn, unet, ema, opt)

    if LATENT_T2I_DIR.exists():
        shutil.rmtree(LATENT_T2I_DIR)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(LATENT_T2I_DIR, safe_serialization=True)
    # also the classic vocab.json/merges.txt pair, for tokenizer loaders that do not read tokenizer.json
    (LATENT_T2I_DIR / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (LATENT_T2I_DIR / "tokenizer" / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    model = LatentModel(vae, unet, text_encoder, tokenizer, sched)
    prompts = [caption(d) for d in range(10) for _ in range(EVAL_PER_DIGIT)]
    imgs = sample_latent_t2i(model, prompts, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE, seed=SEED)
    pred, _ = classify(imgs)
    target = torch.arange(10).repeat_interleave(EVAL_PER_DIGIT)
    per_digit = [float((pred[target == d] == d).float().mean()) for d in range(10)]
    print(f"prompted accuracy per digit {per_digit}, mean {sum(per_digit) / 10:.3f}", flush=True)
    order = torch.arange(len(prompts)).view(10, EVAL_PER_DIGIT)[:, :10].reshape(-1)
    grid_png(imgs[order], LATENT_T2I_DIR / "samples.png", nrow=10)
    loss_curve_png(vae_losses, LATENT_T2I_DIR / "vae_loss_curve.png", "VAE reconstruction MSE")
    loss_curve_png(unet_losses, LATENT_T2I_DIR / "loss_curve.png", "latent UNet eps-MSE")
    metrics = {
        "seed": SEED, "vae_steps": VAE_STEPS, "vae_batch": VAE_BATCH,
        "vae_final_mse_last100_mean": float(torch.tensor(vae_losses[-100:]).mean()),
        "vae_test_mse": rec_mse, "vae_test_label_kept": same, "scaling_factor": scale,
        "unet_steps": UNET_STEPS, "unet_batch": UNET_BATCH,
        "unet_final_loss_last100_mean": float(torch.tensor(unet_losses[-100:]).mean()),
        "params": {"vae": sum(p.numel() for p in vae.parameters()),
                   "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                   "unet": sum(p.numel() for p in unet.parameters())},
        "words": WORDS, "vocab_size": len(vocab), "caption_template": caption(3),
        "eval": {"per_digit": EVAL_PER_DIGIT, "ddim_steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE,
                 "seed": SEED, "accuracy_per_digit": per_digit, "mean_accuracy": sum(per_digit) / 10},
    }
    (LATENT_T2I_DIR / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(metrics)
    print(f"wrote {LATENT_T2I_DIR} ({folder_size_mb(LATENT_T2I_DIR):.2f} MB)")


def write_card(m: dict) -> None:
    e = m["eval"]
    acc = " | ".join(f"{a:.0%}" for a in e["accuracy_per_digit"])
    p = m["params"]
    text = f"""# Demo latent text-to-image model (digits, 3×16×16 ↔ 4×8×8)

A miniature Stable-Diffusion-style model on the demo digits (train split of `cfx_cli.demo.data.load_split`,
[-1, 1]) for the latent explainers (TIME, ECED). Folder layout is diffusers' (`model_index.json`, `vae/`,
`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

- VAE: `AutoencoderKL`, channels (32, 64), 4 latent channels, {p['vae']:,} parameters; {m['vae_steps']} steps,
  batch {m['vae_batch']}, loss MSE + {KL_WEIGHT}·KL (final training MSE
  {m['vae_final_mse_last100_mean']:.5f} in [-1, 1]).
  Held-out reconstruction MSE {m['vae_test_mse']:.5f} in [0, 1]; `demo:digits` keeps its label on
  {m['vae_test_label_kept']:.1%} of held-out reconstructions. Latent scaling factor {m['scaling_factor']:.4f}
  (1 / std of the training latents).
- Tokenizer: transformers `CLIPTokenizer` over our own byte-level BPE vocabulary ({m['vocab_size']} entries,
  generated by the script) in which each caption word is one token: {', '.join(m['words'])}. Lower-cased,
  max length {MAX_LEN}, padded with `<|endoftext|>`. `tokenizer.add_tokens([...])` adds new tokens (textual
  inversion); resize the text encoder's embeddings to match.
- Text encoder: `CLIPTextModel`, hidden 64, 2 layers, 2 heads, {p['text_encoder']:,} parameters, random
  (seed {SEED + 1}) and frozen: the UNet learns to read it.
- UNet: `UNet2DConditionModel`, channels (32, 64), cross-attention at 8×8, {p['unet']:,} parameters,
  ε-objective, scaled-linear β 0.00085 → 0.012 over 1000 steps; {m['unet_steps']} steps, batch
  {m['unet_batch']}, AdamW lr {UNET_LR}, EMA {EMA_DECAY}; captions `"{m['caption_template']}"` (template
  `generators.caption(k)`), {P_EMPTY:.0%} empty. Final loss (mean of the last 100 steps):
  {m['unet_final_loss_last100_mean']:.4f}.
- Reproduce: `python scripts/train_demo_latent.py`. {TIMING}

## Quality (measured by the training script)

{e['per_digit']} samples per digit prompted with `caption(k)`, DDIM {e['ddim_steps']} steps, guidance
{e['guidance']}, seed {e['seed']}; share classified as the prompted digit by `demo:digits`:

| 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | mean |
|---|---|---|---|---|---|---|---|---|---|---|
| {acc} | {e['mean_accuracy']:.1%} |

![UNet loss curve](loss_curve.png)

![VAE loss curve](vae_loss_curve.png)

![samples: row k prompted with caption(k)](samples.png)
"""
    (LATENT_T2I_DIR / "README.md").write_text(text)


if __name__ == "__main__":
    main()
