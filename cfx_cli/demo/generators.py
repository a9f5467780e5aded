"""The embedded demo generators: loaders for the committed weights and the samplers used to check them.

All three live under ``cfx_cli/demo/models/`` as diffusers ``save_pretrained`` folders (safetensors) and
were trained on the demo digits (3×16×16, [-1, 1] inside the models) by ``scripts/train_demo_*.py``:

- ``pixel`` (``demo:pixel``): ``UNet2DModel`` ε-prediction, linear β schedule, 1000 steps (for DiME / ACE).
- ``latent`` (``demo:latent``): ``AutoencoderKL`` (16×16×3 ↔ 8×8×4), a ``CLIPTokenizer`` over our own
  word-level vocabulary,
  a small frozen random ``CLIPTextModel`` and a ``UNet2DConditionModel`` trained on captions such as
  "a handwritten digit three" (10% empty for classifier-free guidance); scaled-linear schedule.
- ``bridge`` (``demo:bridge``): an I2SB-style bridge (``UNet2DModel``) from masked digits to clean ones.

The models are the model layer's ``PixelModel``, ``LatentModel`` and ``BridgeModel`` (``cfx_cli.models``);
diffusers/transformers are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cfx_cli.demo import DEMO_DIR
from cfx_cli.models.bridge import BridgeModel
from cfx_cli.models.latent import LatentModel, load_latent
from cfx_cli.models.pixel import PixelModel, load_pixel

MODELS_DIR = DEMO_DIR / "models"
PIXEL_DDPM_DIR = MODELS_DIR / "pixel"
LATENT_T2I_DIR = MODELS_DIR / "latent"
BRIDGE_DIR = MODELS_DIR / "bridge"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption(digit: int) -> str:
    """The caption template the latent model was trained with ("digit k" prompts use it)."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def _require(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"demo generator {name!r} is missing: {folder} does not exist "
                                f"(train it with scripts/train_demo_*.py)")


# ---------------------------------------------------------------- pixel DDPM
@torch.no_grad()
def sample_pixel_ddpm(model: PixelModel, n: int, steps: int = 50, seed: int = 0,
                      batch: int = 200) -> torch.Tensor:
    """Unconditional DDIM (η = 0) samples of the demo's pixel model (diffusers UNet2DModel and its
    scheduler), (n, 3, 16, 16) in [0, 1] on CPU."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.randn(m, model.net.config.in_channels, size, size, generator=g).to(model.device)
        for t in sched.timesteps:
            eps = model.net(x, t).sample
            x = sched.step(eps, t, x).prev_sample
        out.append(x.cpu())
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------- shared checks
@torch.no_grad()
def classify(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """demo:digits on images in [0, 1] → (predicted label, confidence)."""
    from cfx_cli.demo.classifier import load_pretrained

    clf = load_pretrained("cpu")
    p = torch.softmax(clf(images.float().cpu()), dim=1)
    conf, label = p.max(dim=1)
    return label, conf


# ---------------------------------------------------------------- latent text-to-image
@torch.no_grad()
def sample_latent_t2i(model: LatentModel, prompts: list[str], steps: int = 40, guidance: float = 3.0,
                      seed: int = 0) -> torch.Tensor:
    """Text-conditioned DDIM (η = 0) samples with classifier-free guidance → (N, 3, 16, 16) in [0, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    cond = model.encode_prompts(prompts)
    uncond = model.encode_prompts([""] * len(prompts))
    ctx = torch.cat([uncond, cond])
    c = model.unet.config
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), c.in_channels, c.sample_size, c.sample_size, generator=g).to(model.device)
    for t in sched.timesteps:
        e_u, e_c = model.unet(torch.cat([z, z]), t, encoder_hidden_states=ctx).sample.chunk(2)
        z = sched.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    return model.decode_latents(z).cpu()


# ---------------------------------------------------------------- I2SB-style inpainting bridge
BRIDGE_OPTIONS = {"interval": 1000, "beta_max": 0.3, "t0": 1e-4, "T": 1.0, "cond_x1": False, "ot_ode": True,
                  "corrupt": "inpaint-freeform2030", "image_size": 16}


def make_bridge_schedule(options: dict = BRIDGE_OPTIONS):
    from cfx_cli.diffusion import BridgeSchedule

    return BridgeSchedule.from_options(options["interval"], options["beta_max"], options["t0"], options["T"])


def load_bridge(device: str = "cpu") -> BridgeModel:
    import json

    from diffusers import UNet2DModel

    _require(BRIDGE_DIR, "bridge")
    options = {**BRIDGE_OPTIONS, **json.loads((BRIDGE_DIR / "bridge.json").read_text())}
    net = UNet2DModel.from_pretrained(BRIDGE_DIR / "unet").eval().requires_grad_(False).to(device)
    return BridgeModel(net, make_bridge_schedule(options), options, None, device, torch.float32, "demo:bridge",
                       {"parameters": sum(p.numel() for p in net.parameters())})


def freeform_masks(n: int, area: tuple[float, float] = (0.2, 0.3), size: int = 16,
                   seed: int = 0) -> torch.Tensor:
    """Random free-form brush-stroke masks (n, 1, size, size), 1 = region to inpaint, each covering a fraction
    of the image drawn uniformly from ``area`` (accepted only inside it). Strokes: a few connected segments of
    random direction, length and width, as in the free-form masks I2SB trains with, scaled to 16×16."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    i = 0
    while i < n:
        target = rng.uniform(*area)
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        frac = 0.0
        while frac < target:
            x, y = rng.uniform(0, size, 2)
            width = int(rng.integers(1, 4))
            for _ in range(int(rng.integers(1, 5))):
                angle = rng.uniform(0, 2 * np.pi)
                length = rng.uniform(2, size / 3)
                nx = float(np.clip(x + length * np.cos(angle), 0, size - 1))
                ny = float(np.clip(y + length * np.sin(angle), 0, size - 1))
                draw.line([(x, y), (nx, ny)], fill=255, width=width)
                x, y = nx, ny
            frac = float((np.asarray(img) > 0).mean())
        if frac <= area[1]:
            out[i, 0] = np.asarray(img) > 0
            i += 1
    return torch.from_numpy(out)


def corrupt_for_inpainting(x0: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None):
    """I2SB's inpainting x_1: x0's known pixels ([-1, 1]), the masked region replaced by N(0, 1) noise."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return (1 - mask) * x0 + mask * noise


@torch.no_grad()
def inpaint(model: BridgeModel, images: torch.Tensor, mask: torch.Tensor, nfe: int = 20, seed: int = 0,
            ot_ode: bool = True) -> torch.Tensor:
    """Inpaint ``mask`` (1 = unknown) of images in [0, 1] with the bridge from x_1 to step 0 → [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x0 = images.to(model.device) * 2 - 1
    mask = mask.to(model.device)
    x1 = corrupt_for_inpainting(x0, mask, g)
    out = model.bridge.sample(lambda xt, step: model.pred_x0(xt, step, clip_denoise=True), x1, nfe,
                              ot_ode=ot_ode, mask=mask, x1=x1, generator=g)
    return (out.cpu() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------- demo:NAME dispatch
GENERATORS = {
    "pixel": "pixel DDPM on the digits (UNet2DModel, ε, linear β, 1000 steps) for DiME/ACE",
    "latent": "latent text-to-image on the digits (VAE 8×8×4, CLIP text encoder, UNet) for TIME/ECED",
    "bridge": "I2SB-style free-form inpainting bridge on the digits for RCSB",
}
DIRS = {"pixel": PIXEL_DDPM_DIR, "latent": LATENT_T2I_DIR, "bridge": BRIDGE_DIR}


def model_dir(name: str) -> Path:
    return DIRS[name]


def load(name: str, device: str = "cpu"):
    """``demo:NAME`` → a model of ``kind`` "pixel" / "latent" / "bridge", as ``cfx_cli.models`` loads them."""
    if name not in GENERATORS:
        raise KeyError(f"unknown demo generator {name!r} (available: {', '.join(GENERATORS)})")
    _require(DIRS[name], name)
    if name == "bridge":
        return load_bridge(device)
    loader = load_pixel if name == "pixel" else load_latent
    return loader(DIRS[name], device, source=f"demo:{name}")
