"""Write random-weight files in the layouts of the published checkpoints and classifiers of docs/reproduce.md,
for plumbing runs where the real files cannot be downloaded (the recipes' slow tests use them).

    python bench/make_random_published.py adm OUT.pt --flags "--attention_resolutions 32,16,8 ... --image_size 128"
    python bench/make_random_published.py i2sb OUT_DIR [--flags "--num_channels 32"]   # latest.pt + options.json
    python bench/make_random_published.py densenet-celeba OUT.pth      # DiME/ACE CelebA: {"feat_extract", "classifier"}
    python bench/make_random_published.py densenet-celebahq OUT.tar    # STEEX CelebA-HQ: {"model_state_dict"}
    python bench/make_random_published.py resnet50 OUT.pth             # torchvision ResNet-50 (IMAGENET1K_V1 keys)
    python bench/make_random_published.py vgg19 OUT.pth                # torchvision VGG19 features (DiME's L_perc)
    python bench/make_random_published.py oracle-celeba OUT.pth        # DiME's CelebA oracle (Caffe names)
    python bench/make_random_published.py sd OUT_DIR [--narrow]        # SD 1.x folder (bench/make_random_sd.py)

- ``adm``: the guided-diffusion network the MODEL_FLAGS build (cfx's ADM UNet, the original key names), saved as
  the plain ``torch.save(state_dict)`` file a user passes to ``--model adm:``. Pass ``--num_channels 32`` (a
  smaller base width, every other flag as published) for CPU runs: the layout (resolution, levels, blocks,
  attention resolutions, heads of 64 channels) stays, the FLOPs drop by (published/32)².
- ``i2sb``: I2SB's ``latest.pt`` layout (``net`` with ``diffusion_model.`` keys, ``ema.shadow_params``) of the
  256² inpainting network, with the JSON sidecar cfx reads instead of ``options.pkl`` (β_max 1.0, the value of
  the RCSB configs and the freeform checkpoints); ``--flags`` go to the sidecar's ``adm_flags``.
- ``sd --narrow``: Stable Diffusion 1.x's layout at 512² (VAE with 3 down-samplings to 64² × 4 latents, UNet with
  three cross-attention levels and a plain one, 2 layers per block; CLIP-style text encoder with 77 positions)
  at narrow widths (see make_random_sd.py).
Every parameter is random (the ADM's zero-initialised output layers too, so no gradient is degenerate).
Nothing it writes means anything: use it for shapes, speed and memory, never for quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cfx_cli.models.adm.flags import flags_from_mapping, load_flags, parse_flag_string
from cfx_cli.models.adm.loader import build_unet
from cfx_cli.models.i2sb import I2SB_ADM_FLAGS
from cfx_plugins.explainers.dime import build_vgg19_features
from cfx_plugins.nets.densenet import celeba_densenet, celebahq_densenet
from cfx_plugins.nets.oracle import celeba_oracle, own_key
from cfx_plugins.nets.resnet import ResNet50

sys.path.insert(0, str(Path(__file__).parent))
from make_random_sd import build as build_sd  # noqa: E402 - the sibling bench script

#: I2SB's inpaint-freeform2030 bridge options (NVlabs/I2SB options; β_max as the RCSB configs: 1.0)
I2SB_OPTIONS = {"interval": 1000, "beta_max": 1.0, "t0": 1e-4, "T": 1.0, "cond_x1": False,
                "corrupt": "inpaint-freeform2030", "image_size": 256}


def _randomize(module, seed: int):
    """Fill every parameter with random values (ADM zero-initialises its output convolutions)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module


def random_adm(flags: str, seed: int = 0):
    torch.manual_seed(seed)
    return _randomize(build_unet(load_flags(flags)), seed)


def write_adm(out: Path, flags: str, seed: int = 0) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_adm(flags, seed).state_dict(), out)
    return out


def write_i2sb(out: Path, flags: str = "", seed: int = 0) -> Path:
    """``out/latest.pt`` + ``out/options.json``; returns the checkpoint path."""
    overrides = parse_flag_string(flags) if flags.strip() else {}
    torch.manual_seed(seed)
    net = _randomize(build_unet(flags_from_mapping({**I2SB_ADM_FLAGS, **overrides})), seed)
    out.mkdir(parents=True, exist_ok=True)
    ema = [p.detach().clone() for p in net.parameters()]
    torch.save({"net": {f"diffusion_model.{k}": v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": ema}}, out / "latest.pt")
    options = {**I2SB_OPTIONS, **({"adm_flags": overrides} if overrides else {})}
    (out / "options.json").write_text(json.dumps(options, indent=2))
    return out / "latest.pt"


#: the classifier-like files write_classifier writes
CLASSIFIERS = ("densenet-celeba", "densenet-celebahq", "resnet50", "vgg19", "oracle-celeba")
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def caffe_oracle_keys() -> list[str]:
    """The tensor names of DiME's oracle ``feat_extract`` (``eval_utils/oracle_metrics.py``'s Resnet50_128)."""
    keys = ["conv1_7x7_s2.weight"] + [f"conv1_7x7_s2_bn.{t}" for t in BN_TENSORS]
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3), strict=True):
        for b in range(1, blocks + 1):
            for part in ("1x1_reduce", "3x3", "1x1_increase") + (("1x1_proj",) if b == 1 else ()):
                keys += [f"conv{stage}_{b}_{part}.weight"] + [f"conv{stage}_{b}_{part}_bn.{t}" for t in BN_TENSORS]
    return keys + ["feat_extract.weight"]


def write_classifier(kind: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "densenet-celeba":  # DiVE's file, as DiME's/ACE's classifier.pth
        sd = celeba_densenet().state_dict()
        obj = {"feat_extract": {k.removeprefix("feat_extract."): v for k, v in sd.items()
                                if k.startswith("feat_extract.")},
               "classifier": {k.removeprefix("classifier."): v for k, v in sd.items() if k.startswith("classifier.")}}
    elif kind == "densenet-celebahq":  # STEEX's checkpoint.tar
        obj = {"model_state_dict": celebahq_densenet().state_dict(), "epoch": 0}
    elif kind == "resnet50":  # torchvision's resnet50-0676ba61.pth
        obj = ResNet50().state_dict()
    elif kind == "oracle-celeba":  # DiME's models/oracle.pth: Caffe-named feat_extract + a 40-way head
        sd = celeba_oracle().state_dict()
        obj = {"feat_extract": {k: sd[own_key(k)] for k in caffe_oracle_keys()},
               "classifier": {k.removeprefix("classifier."): v for k, v in sd.items() if k.startswith("classifier.")}}
        assert len(obj["feat_extract"]) + 2 == len(sd), "every oracle tensor has a Caffe name"
    elif kind == "vgg19":  # the features of torchvision's vgg19-dcbb9e9d.pth
        obj = {f"features.{k}": v for k, v in build_vgg19_features(37).state_dict().items()}
    else:
        raise ValueError(kind)
    torch.save(obj, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("adm", "i2sb", "sd") + CLASSIFIERS)
    ap.add_argument("out")
    ap.add_argument("--flags", default="", help="adm: the MODEL_FLAGS; i2sb: flags overriding I2SB's network")
    ap.add_argument("--narrow", action="store_true", help="sd: narrow widths, SD 1.x's layout at 512²")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.kind == "adm":
        if not args.flags:
            ap.error("adm needs --flags")
        print(write_adm(out, args.flags, args.seed))
    elif args.kind == "i2sb":
        print(write_i2sb(out, args.flags, args.seed))
    elif args.kind == "sd":
        print(build_sd(out, args.seed, narrow=args.narrow))
    else:
        print(write_classifier(args.kind, out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
