"""TIME per-explanation time at Stable Diffusion 1.x size, per backend, with ratios against fp32 eager torch.

    python bench/time_sd_backends.py [--device cuda] [--resolution 512] [--tau 35] [--steps 50] [--w 4]
                                     [--batch 1] [--repeats 3] [--variants eager,fp16,...] [--out FILE.json]

One TIME explanation attempt as `cfx explain --method time` runs it (cfx_plugins/explainers/time/generate.py): VAE
encode, EDICT inversion over τ of T DDIM steps with the source prompt (target as negative guidance), EDICT denoising
with the roles swapped, VAE decode. Random weights with SD 1.x's shapes: the UNet of bench/unet_backends.py (860M
parameters, 77×768 text), AutoencoderKL 128/256/512/512 (8× downsampling), scaled-linear β. Prompt embeddings are
random (the text encoder runs once per class, not per explanation; the classifier call is excluded). Variants go
through the same `--backend/--precision/--channels-last/--compile` options as the CLI:

  eager          torch fp32 eager (the published implementation's regime; the reference)
  channels_last  torch fp32, channels_last
  fp16 / bf16    torch fp16 / bf16 copies of UNet and VAE
  fp16_cl        torch fp16 + channels_last
  fp16_compile   torch fp16 + torch.compile (first call compiles; excluded from timing)
  fp16_graphs    torch fp16 + torch.compile mode reduce-overhead (CUDA graphs)
  graphs         torch fp32 + torch.compile mode reduce-overhead
  onnx           ONNX Runtime (CUDA execution provider on a GPU; refused with its reason where unavailable)
  tensorrt       ONNX Runtime's TensorRT execution provider (likewise)

Timing: after one warm-up explanation per variant, variants run in turn, round after round, so they share the
machine's conditions; medians of --repeats rounds. FLOPs per explanation are counted with torch's
FlopCounterMode on one eager fp32 explanation; the share of peak divides the achieved FLOP/s by the measured
dense matmul peak of the same precision on this device (8192³, median of 5).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from types import SimpleNamespace

from cfx_cli.explainers import RunOptions

VARIANTS = {
    "eager": {"backend": "torch"},
    "channels_last": {"backend": "torch", "channels_last": True},
    "fp16": {"backend": "torch", "backend_precision": "fp16"},
    "bf16": {"backend": "torch", "backend_precision": "bf16"},
    "fp16_cl": {"backend": "torch", "backend_precision": "fp16", "channels_last": True},
    "fp16_compile": {"backend": "torch", "backend_precision": "fp16", "compile": True},
    "fp16_graphs": {"backend": "torch", "backend_precision": "fp16", "compile": "reduce-overhead"},
    "graphs": {"backend": "torch", "compile": "reduce-overhead"},
    "onnx": {"backend": "onnx"},
    "onnx_fp16": {"backend": "onnx", "backend_precision": "fp16"},
    "tensorrt": {"backend": "tensorrt", "backend_precision": "fp16"},
}


def sd1_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()


def build_model(resolution: int, device: str, small: bool):
    import torch
    from diffusers import DDIMScheduler

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from unet_backends import sd1_unet

    from cfx_cli.models import LatentModel

    vae = sd1_vae().to(device).eval().requires_grad_(False)
    if not small:
        unet = sd1_unet().to(device).eval().requires_grad_(False)
    else:  # CPU smoke runs: SD's layout, fewer channels
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64, 64), cross_attention_dim=768, attention_head_dim=8,
            norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).to(device).eval().requires_grad_(False)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    text = SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(weight=torch.zeros(1, 768)))
    return LatentModel(vae=vae, unet=unet, text_encoder=text, tokenizer=SimpleNamespace(model_max_length=77),
                       scheduler=sched, device=device, dtype=unet.dtype, spec="random SD-1.x")


def generator(model, device: str):
    import torch

    from cfx_plugins.explainers.time.generate import TimeGenerator

    meta = {"labels": ["source", "target"], "tokens": {"context": [], "classes": {}}, "prompts": {"class": ""}}
    gen = TimeGenerator(model, meta)
    g = torch.Generator().manual_seed(1)
    gen._embeds = {k: torch.randn(1, 77, 768, generator=g).to(device) for k in (0, 1)}  # fixed prompts
    return gen


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype) -> float:
    import torch

    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(7):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--tau", type=int, default=35)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--w", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="eager,channels_last,fp16,bf16,fp16_cl,fp16_compile,onnx,tensorrt")
    ap.add_argument("--small", action="store_true", help="a narrow SD-layout UNet (CPU smoke runs)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    dev = args.device
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or names[:1] != ["eager"]:
        ap.error(f"--variants must start with eager and use {', '.join(VARIANTS)}")

    model = build_model(args.resolution, dev, args.small)
    gen = generator(model, dev)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g)
    src, tgt = torch.zeros(args.batch, dtype=torch.long), torch.ones(args.batch, dtype=torch.long)
    size = (args.resolution, args.resolution)

    def explain():
        latents = gen.encode(images)
        return gen.counterfactuals(latents, src, tgt, args.tau, args.w, args.steps, 0.93, "exact", size)

    from torch.utils.flop_counter import FlopCounterMode

    model.forward = None
    with FlopCounterMode(display=False) as counter:
        explain()
    flops = counter.get_total_flops() / args.batch
    peaks = {"fp32": matmul_peak(dev, torch.float32), "fp16": matmul_peak(dev, torch.float16),
             "bf16": matmul_peak(dev, torch.bfloat16)}

    ready, notes = {}, []
    reference = None
    for name in names:
        ctx = SimpleNamespace(options=RunOptions(**VARIANTS[name]), device=dev)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # a refused backend says why; those lines become notes
            t0 = time.perf_counter()
            desc = model.use_backend(ctx)
            msgs = [m for m in err.getvalue().splitlines() if m.strip()]
            if VARIANTS[name]["backend"] != "torch" and desc.startswith("torch"):
                notes.append(f"{name}: refused — {msgs[-1] if msgs else 'fell back to torch'}")
                continue
            state = model.forward
            out = explain()  # warm-up (and compile / export)
            sync(dev)
            warm = time.perf_counter() - t0
        msgs = [m for m in err.getvalue().splitlines() if m.strip()]
        if reference is None:
            reference = out
        diff = float((out - reference).abs().max())
        ready[name] = (state, desc, diff, warm)
        notes.extend(f"{name}: {m}" for m in msgs)

    times: dict[str, list[float]] = {n: [] for n in ready}
    for _ in range(args.repeats):
        for name, (state, _, _, _) in ready.items():
            model.forward = state
            sync(dev)
            t0 = time.perf_counter()
            explain()
            sync(dev)
            times[name].append((time.perf_counter() - t0) / args.batch)

    dev_name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
    print(f"device {dev_name}; torch {torch.__version__}; {args.resolution}² images "
          f"({args.resolution // 8}² latents), τ = {args.tau} of T = {args.steps}, w = {args.w}, batch "
          f"{args.batch}, {args.repeats} rounds; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
          f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    print(f"FLOPs per explanation (FlopCounterMode, eager fp32): {flops / 1e9:.1f} GFLOP; measured matmul peak "
          + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks.items()))
    ref = statistics.median(times["eager"])
    header = f"{'variant':<14} {'backend':<40} {'s/explanation':>13} {'× vs eager':>10} {'GFLOP/s':>8} " \
             f"{'% peak':>7} {'max |Δ| img':>11} {'first call s':>12}"
    print(header)
    rows = []
    for name, (_, desc, diff, warm) in ready.items():
        med = statistics.median(times[name])
        prec = VARIANTS[name].get("backend_precision", "fp32")
        achieved = flops / med
        rows.append({"variant": name, "backend": desc, "seconds": med, "ratio": ref / med,
                     "tflops": achieved / 1e12, "share_of_peak": achieved / peaks[prec], "max_abs_diff": diff,
                     "first_call_s": warm, "all_seconds": times[name]})
        print(f"{name:<14} {desc:<40} {med:>13.3f} {ref / med:>10.2f} {achieved / 1e9:>8.0f} "
              f"{100 * achieved / peaks[prec]:>6.1f}% {diff:>11.2e} {warm:>12.1f}")
    for note in notes:
        print("note:", note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev_name, "torch": torch.__version__, "args": vars(args), "flops": flops,
                       "peaks": peaks, "rows": rows, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
