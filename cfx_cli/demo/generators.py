"""The embedded demo generators: loaders for the committed weights and the samplers used to check them.

All three live under ``cfx_cli/demo/models/`` as diffusers ``save_pretrained`` folders (safetensors) and
were trained on the demo digits (3×16×16, [-1, 1] inside the models) by ``scripts/train_demo_*.py``:

- ``pixel`` (``demo:pixel``): ``UNet2DModel`` ε-prediction, linear β schedule, 1000 steps (for DiME / ACE).
- ``latent`` (``demo:latent``): ``AutoencoderKL`` (16×16×3 ↔ 8×8×4), a ``CLIPTokenizer`` over our own
  word-level vocabulary,
  a small frozen random ``CLIPTextModel`` and a ``UNet2DConditionModel`` trained on captions such as
  "a handwritten digit three" (10% empty for classifier-free guidance); scaled-linear schedule.
- ``bridge`` (``demo:bridge``): an I2SB-style bridge (``UNet2DModel``) from masked digits to clean ones.

diffusers/transformers are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cfx_cli.demo import DEMO_DIR

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
@dataclass
class PixelDDPM:
    unet: Any  # diffusers.UNet2DModel, inputs (N, 3, 16, 16) in [-1, 1]
    scheduler: Any  # diffusers.DDPMScheduler (linear betas, ε-prediction)
    device: str = "cpu"


def load_pixel_ddpm(device: str = "cpu") -> PixelDDPM:
    from diffusers import DDPMScheduler, UNet2DModel

    _require(PIXEL_DDPM_DIR, "pixel-ddpm")
    unet = UNet2DModel.from_pretrained(PIXEL_DDPM_DIR / "unet").eval().to(device)
    scheduler = DDPMScheduler.from_pretrained(PIXEL_DDPM_DIR / "scheduler")
    return PixelDDPM(unet, scheduler, device)


@torch.no_grad()
def sample_pixel_ddpm(model: PixelDDPM, n: int, steps: int = 50, seed: int = 0,
                      batch: int = 200) -> torch.Tensor:
    """Unconditional DDIM (η = 0) samples, (n, 3, 16, 16) in [0, 1] on CPU."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    size = model.unet.config.sample_size
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        x = torch.randn(m, model.unet.config.in_channels, size, size, generator=g).to(model.device)
        for t in sched.timesteps:
            eps = model.unet(x, t).sample
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
@dataclass
class LatentT2I:
    vae: Any  # diffusers.AutoencoderKL: (N, 3, 16, 16) in [-1, 1] ↔ (N, 4, 8, 8); × config.scaling_factor
    unet: Any  # diffusers.UNet2DConditionModel on 4×8×8 latents, cross-attention dim = text hidden size
    text_encoder: Any  # transformers.CLIPTextModel (frozen, random; our vocabulary)
    tokenizer: Any  # transformers.CLIPTokenizer, our vocabulary (caption words = 1 token), max length 8
    scheduler: Any  # diffusers.DDPMScheduler, scaled-linear betas, ε-prediction
    device: str = "cpu"


def load_latent_t2i(device: str = "cpu") -> LatentT2I:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _require(LATENT_T2I_DIR, "latent-t2i")
    vae = AutoencoderKL.from_pretrained(LATENT_T2I_DIR / "vae").eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(LATENT_T2I_DIR / "unet").eval().to(device)
    text_encoder = CLIPTextModel.from_pretrained(LATENT_T2I_DIR / "text_encoder").eval().to(device)
    tokenizer = CLIPTokenizer.from_pretrained(LATENT_T2I_DIR / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(LATENT_T2I_DIR / "scheduler")
    return LatentT2I(vae, unet, text_encoder, tokenizer, scheduler, device)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(model: LatentT2I, prompts: list[str]) -> torch.Tensor:
    ids = tokenize(model.tokenizer, prompts).to(model.device)
    return model.text_encoder(ids).last_hidden_state


@torch.no_grad()
def decode_latents(model: LatentT2I, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [0, 1]."""
    x = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_latent_t2i(model: LatentT2I, prompts: list[str], steps: int = 40, guidance: float = 3.0,
                      seed: int = 0) -> torch.Tensor:
    """Text-conditioned DDIM (η = 0) samples with classifier-free guidance → (N, 3, 16, 16) in [0, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, [""] * len(prompts))
    ctx = torch.cat([uncond, cond])
    c = model.unet.config
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), c.in_channels, c.sample_size, c.sample_size, generator=g).to(model.device)
    for t in sched.timesteps:
        e_u, e_c = model.unet(torch.cat([z, z]), t, encoder_hidden_states=ctx).sample.chunk(2)
        z = sched.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
    return decode_latents(model, z).cpu()


# ---------------------------------------------------------------- I2SB-style inpainting bridge
BRIDGE_OPTIONS = {"interval": 1000, "beta_max": 0.3, "t0": 1e-4, "T": 1.0, "cond_x1": False, "ot_ode": True,
                  "corrupt": "inpaint-freeform2030", "image_size": 16}


@dataclass
class DemoBridge:
    """The demo bridge with the interface of ``cfx_cli.models.i2sb.BridgeModel`` (kind "bridge"): calling it
    gives the network output (x_t - x_0)/σ_t at bridge step(s) ``step``; ``pred_x0`` the x̂_0 estimate."""

    net: Any  # diffusers.UNet2DModel, time input = the bridge's network time (I2SB convention)
    bridge: Any  # cfx_cli.diffusion.BridgeSchedule
    options: dict
    device: str = "cpu"
    dtype: Any = None
    source: str = "demo:bridge"
    info: dict | None = None

    kind = "bridge"

    @property
    def image_size(self) -> int:
        return int(self.options["image_size"])

    @property
    def cond_x1(self) -> bool:
        return bool(self.options.get("cond_x1"))

    def __call__(self, x_t: torch.Tensor, step: torch.Tensor | int, cond: torch.Tensor | None = None):
        t = self.bridge.network_time(step, batch=x_t.shape[0]).to(x_t.device)
        if t.numel() == 1 and x_t.shape[0] > 1:
            t = t.expand(x_t.shape[0])
        return self.net(x_t, t).sample.float()

    def pred_x0(self, x_t, step, cond=None, clip_denoise: bool = False):
        return self.bridge.pred_x0(step, x_t, self(x_t, step, cond), clip_denoise)


def make_bridge_schedule(options: dict = BRIDGE_OPTIONS):
    from cfx_cli.diffusion import BridgeSchedule

    return BridgeSchedule.from_options(options["interval"], options["beta_max"], options["t0"], options["T"])


def load_bridge(device: str = "cpu") -> DemoBridge:
    import json

    from diffusers import UNet2DModel

    _require(BRIDGE_DIR, "bridge")
    options = {**BRIDGE_OPTIONS, **json.loads((BRIDGE_DIR / "bridge.json").read_text())}
    net = UNet2DModel.from_pretrained(BRIDGE_DIR / "unet").eval().requires_grad_(False).to(device)
    return DemoBridge(net, make_bridge_schedule(options), options, device, torch.float32,
                      info={"parameters": sum(p.numel() for p in net.parameters())})


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
def inpaint(model: DemoBridge, images: torch.Tensor, mask: torch.Tensor, nfe: int = 20, seed: int = 0,
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
    from cfx_cli.models.diffusers_models import load_latent, load_pixel

    loader = load_pixel if name == "pixel" else load_latent
    return loader(DIRS[name], device, source=f"demo:{name}")
