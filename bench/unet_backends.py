"""UNet forward time per backend, with the ratio against plain fp32 eager torch measured in the same run.

    python bench/unet_backends.py [--repeats 7] [--demo-batch 8] [--sd-latent 16] [--sd-batch 1]
                                  [--skip-sd] [--compile] [--fp16] [--threads N]

Two configurations:
  demo  the embedded pixel DDPM (demo:pixel, a diffusers UNet2DModel), 3×16×16 images, batch --demo-batch;
  sd1   a UNet2DConditionModel with Stable Diffusion 1.x's shape (block widths 320/640/1280/1280, two layers per
        block, cross-attention in the first three down / last three up blocks, 8 heads, cross-attention dim 768,
        77 text tokens), random weights, latents 4×L×L (L = --sd-latent; 16 takes about a second on a CPU).

Backends: torch fp32 eager (the reference), torch fp32 channels_last, [torch.compile], ONNX Runtime (this
machine's best provider; CPU here), [ONNX Runtime fp16]. Each accelerated build passes the parity gate first
(max |Δ| / max |torch|; its value is printed). Timing: after 2 warm-up calls, the backends are called in
turn, round after round, so they share the machine's conditions; the median of --repeats rounds is reported.
Exports go to a temporary cache (not ~/.cache/cfx), so every run measures a fresh build.

FLOPs per forward: matmul/conv/attention FLOPs of one eager torch call on the timed inputs (bench/flops.py; the
same arithmetic every backend does). Share of peak: FLOPs ÷ median seconds ÷ this machine's fp32 matmul rate
(torch.mm, same thread count), measured at the start of the run and printed; a measured, achievable rate, not a
datasheet number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from flops import count_flops, fmt_flops, measure_sgemm_peak, share_of_peak


def sd1_unet(seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    ).eval()


def backends_for(module, example, args, cache: str) -> tuple[list[tuple[str, object, str]], list[str]]:
    from cfx_cli.backends import TorchBackend, onnx_backend
    from cfx_cli.backends.base import BackendError

    out = [("torch fp32 eager", TorchBackend(module), "ref"),
           ("torch fp32 channels_last", TorchBackend(module, channels_last=True), "-")]
    notes = []
    if args.compile:
        out.append(("torch fp32 compile", TorchBackend(module, compile=True), "-"))
    for precision in ("fp32", "fp16") if args.fp16 else ("fp32",):
        t0 = time.monotonic()
        try:
            b = onnx_backend.build(module, example, "onnx", precision, "cpu", cache_dir=cache)
        except BackendError as exc:
            notes.append(f"onnx {precision}: refused: {exc}")
            continue
        notes.append(f"onnx {precision}: export + session + gate {time.monotonic() - t0:.1f}s")
        out.append((f"onnx {precision} ({b.providers[0].replace('ExecutionProvider', '')})", b,
                    f"{b.parity_error:.1e}"))
    return out, notes


def time_round_robin(backends, inputs, repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    times: dict[str, list[float]] = {name: [] for name, _, _ in backends}
    outputs = {}
    for _ in range(2):
        for name, b, _ in backends:
            outputs[name] = b(*inputs)
    for _ in range(repeats):
        for name, b, _ in backends:
            t0 = time.perf_counter()
            b(*inputs)
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def run_config(label: str, module, example, inputs, args, rows: list, all_notes: list, peak) -> None:
    import torch

    with torch.no_grad():
        flops, _ = count_flops(module, *inputs)
    with tempfile.TemporaryDirectory(prefix="cfx-bench-") as cache:
        backends, notes = backends_for(module, example, args, cache)
        all_notes += [f"{label}: {n}" for n in notes]
        times, outputs = time_round_robin(backends, inputs, args.repeats)
    eager = "torch fp32 eager"
    ref = statistics.median(times[eager])
    ref_out = outputs[eager]
    for name, _, parity in backends:
        med = statistics.median(times[name])
        # the ratio within each round (the backends ran back to back), then its median over the rounds
        per_round = statistics.median(e / t for e, t in zip(times[eager], times[name], strict=True))
        rel = float((outputs[name] - ref_out).abs().max() / ref_out.abs().max())
        rows.append((label, name, med * 1000, ref / med, per_round, parity, rel, flops,
                     share_of_peak(flops, med, peak), min(times[name]) * 1000))


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (default: torch's)")
    ap.add_argument("--demo-batch", type=int, default=8)
    ap.add_argument("--sd-latent", type=int, default=16)
    ap.add_argument("--sd-batch", type=int, default=1)
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build on a CPU)")
    ap.add_argument("--fp16", action="store_true", help="also build an fp16 ONNX export")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cfx_cli.backends.latent import unet_module
    from cfx_cli.backends.pixel import net_module
    from cfx_cli.models import load_model

    rows: list = []
    notes: list[str] = []
    peak = measure_sgemm_peak()
    g = torch.Generator().manual_seed(0)
    demo = load_model("demo:pixel", expect="pixel")
    net = net_module(demo).eval()
    n = args.demo_batch
    run_config(f"demo 3×16×16 b{n}", net, (torch.zeros(1, 3, 16, 16), torch.zeros(1)),
               (torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g).float()),
               args, rows, notes, peak)
    if not args.skip_sd:
        unet = unet_module(sd1_unet())
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        L, n = args.sd_latent, args.sd_batch
        run_config(f"sd1 ({params:.0f}M) 4×{L}×{L} b{n}", unet,
                   (torch.zeros(1, 4, L, L), torch.zeros(1), torch.zeros(1, 77, 768)),
                   (torch.randn(n, 4, L, L, generator=g), torch.full((n,), 500.0),
                    torch.randn(n, 77, 768, generator=g)), args, rows, notes, peak)
    peak_after = measure_sgemm_peak()  # the CPU is shared: the rate moves with the other jobs' load

    import onnxruntime as ort

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
          f"{args.repeats} rounds")
    print(peak.describe())
    print(f"(re-measured after the run: {peak_after.flops_per_s / 1e9:.1f} GFLOP/s)")
    print(f"{'config':<26} {'backend':<28} {'median ms':>10} {'min ms':>8} {'× eager':>8} {'× /round':>8} "
          f"{'gate':>8} {'rel Δ':>8} {'FLOPs/fwd':>10} {'GFLOP/s':>8} {'% peak':>7}")
    for label, name, ms, ratio, per_round, parity, rel, flops, share, lo in rows:
        print(f"{label:<26} {name:<28} {ms:>10.1f} {lo:>8.1f} {ratio:>8.2f} {per_round:>8.2f} {parity:>8} "
              f"{rel:>8.1e} {fmt_flops(flops):>10} {flops / ms / 1e6:>8.2f} {share:>7.1%}")
    print("× eager: median eager time / median time; × /round: median over rounds of eager / backend time in that "
          "round; gate: the parity gate's max relative error (random inputs, batch 2); rel Δ: max |out − eager| / "
          "max |eager| on the timed inputs")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
