"""Which of ECED's backward passes work with each scaled-dot-product-attention kernel set on this device.

    python bench/eced_sdpa_check.py [--model demo:latent] [--device cuda] [--batch 2]

ECED differentiates through the UNet (Alg. 3) and through per-image decoder copies stacked under
``torch.func.vmap`` (Alg. 2 and the decoding). On an H100 with torch 2.11 one of them failed with the
memory-efficient SDPA kernel ("LSE is not correctly aligned"), so ECED restricts its backward passes on CUDA to
flash + math (`cfx_plugins/explainers/eced/core.py:attention_for_gradients`). This script prints, for each pass
and kernel set, "ok" with the time of one forward+backward, or the error, so the restriction can be narrowed or lifted
when torch changes.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cfx_cli.models import load_model
    from cfx_plugins.explainers.eced.core import StackedDecoders

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:latent")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    m = load_model(args.model, device=args.device, expect="latent")
    dev, n = args.device, args.batch
    side = m.latent_side
    c = int(m.unet.config.in_channels)
    seq = int(m.tokenizer.model_max_length)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, side, side, generator=g).to(dev)
    text = torch.randn(n, seq, m.embedding_dim, generator=g).to(dev)

    def unet_pass():
        zz = z.clone().requires_grad_(True)
        m.unet(zz, torch.full((n,), 500, device=dev), encoder_hidden_states=text).sample.square().mean().backward()

    decoders = StackedDecoders(m.vae, m.scaling_factor, n)

    def vmapped_decoder_pass():
        zz = z.clone().requires_grad_(True)
        decoders(zz).square().mean().backward()

    def plain_decoder_pass():
        zz = z.clone().requires_grad_(True)
        m.vae.decode(zz / m.scaling_factor).sample.square().mean().backward()

    sets = {"default (all kernels)": None,
            "efficient only": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
            "flash + math (ECED on CUDA)": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
            "math only": [SDPBackend.MATH]}
    print(f"{args.model} on {dev} (torch {torch.__version__}), batch {n}, latents {c}×{side}×{side}")
    # a failing CUDA kernel can leave the context unusable (later calls then fail with "illegal memory access"):
    # the passes and kernel sets expected to work run first, and the first CUDA error ends the run
    order = [("UNet fwd+bwd", unet_pass), ("plain VAE decoder fwd+bwd", plain_decoder_pass),
             ("vmapped decoder copies fwd+bwd", vmapped_decoder_pass)]
    names = ["math only", "flash + math (ECED on CUDA)", "efficient only", "default (all kernels)"]
    for pname, fn in order:
        for sname in names:
            kernels = sets[sname]
            ctx = sdpa_kernel(kernels) if kernels else torch.enable_grad()
            try:
                with ctx:
                    fn()  # warm-up
                    if dev.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    if dev.startswith("cuda"):
                        torch.cuda.synchronize()
                print(f"  {pname:<32} {sname:<28} ok   {1000 * (time.perf_counter() - t0):8.1f} ms")
            except RuntimeError as exc:
                print(f"  {pname:<32} {sname:<28} FAIL {str(exc).splitlines()[0][:90]}")
                if dev.startswith("cuda"):
                    try:
                        torch.cuda.synchronize()
                        torch.zeros(1, device=dev).item()
                    except Exception:  # noqa: BLE001 - any error here means the context is gone
                        print("  (the CUDA context is unusable after this error: later rows not run)")
                        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
