"""``PixelModel``: the one pixel diffusion prior (DiME, ACE): a guided-diffusion ADM network (``adm:``) or a
diffusers ``UNet2DModel`` (``diffusers:`` folders, ``demo:pixel``), with its noise schedule, called with schedule
indices on images in [-1, 1].

``pixel_prior`` is what the pixel explainers call: the model of ``--model`` (or ``demo:pixel``) on the schedule
respacing the method asks for. torch and diffusers are imported by the loaders, not by this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.models.folders import DIFFUSERS_WEIGHTS, missing_in
from cfx_cli.models.memory import MemoryOptions, apply_to_diffusers, resolve_dtype


def require_size(images, size: tuple[int, int], who: str) -> None:
    """Refuse to run a network made for ``size`` (H, W) on images (a tensor or a shape ending in H, W) of another:
    cfx brings every input to the generator's own size before it runs (a 16×16 demo prior asked to work at 512²
    gives a grey blur after thousands of calls)."""
    shape = tuple(getattr(images, "shape", images))[-2:]
    if shape != tuple(size):
        raise ValueError(f"{who} works at {size[1]}×{size[0]} only; refusing images of {shape[1]}×{shape[0]}")


@dataclass
class PixelModel:
    """A pixel diffusion network with its ``GaussianDiffusion`` schedule (kind "pixel").

    ``flags`` is set for ADM networks (they take ``(x, t, y)`` and convert their own torso's dtype); without it
    ``net`` is a diffusers ``UNet2DModel`` (``.sample`` output, ``class_labels``). ``respacer`` rebuilds the
    schedule for ``with_respacing`` (ADM: from the flags' base schedule); None respaces the current one."""

    net: Any
    diffusion: Any  # cfx_cli.diffusion.GaussianDiffusion
    image_size: int
    device: str = "cpu"
    dtype: Any = None
    source: str = ""
    info: dict = field(default_factory=dict)
    flags: Any = None  # cfx_cli.models.adm.ADMFlags for ADM networks
    scheduler: Any = None  # the diffusers scheduler the schedule was read from
    respacer: Callable[[str], Any] | None = None
    spec: str = ""  # the --model spec it was loaded from

    kind = "pixel"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images the network works on (DiME's and ACE's working size): it runs at no other."""
        return (self.image_size, self.image_size)

    @property
    def learn_sigma(self) -> bool:
        return self.diffusion.variance_type == "learned_range"

    def with_respacing(self, respacing: str) -> PixelModel:
        """The same network on a subset of the schedule's steps (guided-diffusion ``timestep_respacing``)."""
        diffusion = self.respacer(respacing) if self.respacer else self.diffusion.respaced(respacing)
        return dataclasses.replace(self, diffusion=diffusion, info=dict(self.info))

    def schedule_summary(self) -> str:
        d = self.diffusion
        return f"{d.num_steps} of {d.original_num_steps} steps, variance {d.variance_type}"

    def __call__(self, x, t, y=None):
        """Network output (float32) for images ``x`` in [-1, 1] at schedule indices ``t`` (int or (N,))."""
        require_size(x, self.size, self.spec or self.source)
        ts = self.diffusion.model_timesteps(t, batch=x.shape[0]).to(x.device)
        if ts.numel() == 1 and x.shape[0] > 1:
            ts = ts.expand(x.shape[0])
        if self.flags is not None:
            return self.net(x, ts, y).float()
        kwargs = {"class_labels": y} if y is not None else {}
        return self.net(x.to(self.dtype), ts, **kwargs).sample.float()


def diffusion_from_scheduler(scheduler, learned: bool = False):
    """A ``GaussianDiffusion`` with the betas of a diffusers scheduler."""
    from cfx_cli.diffusion import GaussianDiffusion

    cfg = scheduler.config
    variance = (
        "learned_range" if learned else ("fixed_large" if cfg.get("variance_type") == "fixed_large" else "fixed_small")
    )
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "sample", "v_prediction"):
        raise UsageError(f"scheduler prediction_type {pred!r} is not supported (epsilon, sample or v_prediction)")
    return GaussianDiffusion(scheduler.betas.double(), variance_type=variance, prediction_type=pred)


def load_pixel(folder: Path, device: str = "cpu", memory: MemoryOptions | None = None, source: str = "") -> PixelModel:
    """A diffusers ``UNet2DModel`` folder (or a pipeline folder with ``unet/``) and its DDPM schedule."""
    from diffusers import DDPMScheduler, UNet2DModel

    memory = memory or MemoryOptions()
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    missing = [f"{unet_dir.name}/{m}" for m in missing_in(unet_dir, [("config.json",), DIFFUSERS_WEIGHTS])]
    if missing:
        raise UsageError(f"diffusers:{source or folder}: missing {', '.join(missing)}")
    dtype = resolve_dtype(device, memory.precision, f"diffusers:{source or folder}")
    net = UNet2DModel.from_pretrained(str(unet_dir), torch_dtype=dtype).to(device).eval().requires_grad_(False)
    apply_to_diffusers(net, memory)
    sched_dir = next((d for d in (folder / "scheduler", folder) if (d / "scheduler_config.json").is_file()), None)
    scheduler = DDPMScheduler.from_pretrained(str(sched_dir)) if sched_dir else DDPMScheduler()
    learned = (
        scheduler.config.get("variance_type") == "learned_range"
        or net.config.out_channels == 2 * net.config.in_channels
    )
    size = net.config.sample_size
    return PixelModel(
        net,
        diffusion_from_scheduler(scheduler, learned),
        size if isinstance(size, int) else size[0],
        device,
        dtype,
        source or str(folder),
        {"parameters": sum(p.numel() for p in net.parameters())},
        scheduler=scheduler,
    )
