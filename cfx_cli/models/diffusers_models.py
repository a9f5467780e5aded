"""diffusers models: pixel ``UNet2DModel`` folders and Stable Diffusion 1.x/2.x components.

A spec is a local folder or a Hugging Face hub id. Hub ids resolve through the local HF cache first (no network
when cached, none at all with ``HF_HUB_OFFLINE=1``). Every required file is checked before anything loads so a
missing one fails in one line naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.models.memory import MemoryOptions, apply_to_diffusers, apply_to_text_encoder, resolve_dtype

# weight file names, in the order they are preferred
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
)
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.fp16.safetensors",
)
SD_COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def _component_requirements(name: str) -> list[tuple[str, ...]]:
    """Per component: groups of alternatives, one file of each group must exist."""
    if name in ("unet", "vae"):
        return [("config.json",), DIFFUSERS_WEIGHTS]
    if name == "text_encoder":
        return [("config.json",), TRANSFORMERS_WEIGHTS]
    if name == "tokenizer":
        return [("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json")]
    if name == "scheduler":
        return [("scheduler_config.json",)]
    raise ValueError(name)


def missing_files(folder: Path, components: tuple[str, ...]) -> list[str]:
    """Files (relative to ``folder``) that are required and absent, one entry per unmet requirement."""
    missing = []
    for comp in components:
        sub = folder / comp
        if not sub.is_dir():
            missing.append(f"{comp}/")
            continue
        for group in _component_requirements(comp):
            if not any((sub / f).is_file() for f in group):
                missing.append(f"{comp}/" + (" or ".join(group) if len(group) < 3 else f"{group[0]} (or .bin)"))
    return missing


def _offline() -> bool:
    truthy = ("1", "on", "yes", "true")
    if (
        os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
        or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in truthy
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists()


def resolve_folder(spec: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder for a ``diffusers:`` spec: the folder itself, or the cached snapshot of a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"diffusers:{spec}: expected a folder (a diffusers model or pipeline), found a file")
    if not looks_like_hub_id(spec):
        raise UsageError(f"diffusers:{spec}: no such folder (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(
            f"diffusers:{spec}: not a local folder, and huggingface_hub is not installed to resolve hub ids"
        ) from None
    try:
        return Path(snapshot_download(spec, local_files_only=True, allow_patterns=allow_patterns))
    except Exception as exc:  # LocalEntryNotFoundError & co: not (fully) cached
        cached_error = exc
    if _offline():
        raise UsageError(
            f"diffusers:{spec}: no such local folder, and as a hub id not found in the Hugging Face cache "
            f"({_cache_dir()}) while HF_HUB_OFFLINE is set; download it once online (`hf download {spec}`) "
            "or pass a local folder"
        ) from None
    try:
        return Path(snapshot_download(spec, allow_patterns=allow_patterns))
    except Exception as exc:
        raise UsageError(
            f"diffusers:{spec}: not cached and the download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"cache lookup said: {type(cached_error).__name__}"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc})") from None


def folder_kind(folder: Path) -> str:
    """``latent`` (Stable Diffusion components), ``pixel`` (UNet2DModel), or raise naming what is missing."""
    index = folder / "model_index.json"
    if index.is_file():
        info = _read_json(index)
        if "text_encoder" in info or "vae" in info:
            return "latent"
        if "unet" in info:
            return "pixel"
    if (folder / "config.json").is_file():
        cls = _read_json(folder / "config.json").get("_class_name", "")
        if cls == "UNet2DModel":
            return "pixel"
        raise UsageError(
            f"diffusers:{folder}: config.json describes a {cls or 'model of unknown class'}; expected "
            "a UNet2DModel folder or a pipeline folder with model_index.json"
        )
    if (folder / "unet").is_dir():
        unet_cfg = folder / "unet" / "config.json"
        if unet_cfg.is_file() and _read_json(unet_cfg).get("_class_name") == "UNet2DModel":
            return "pixel"
        return "latent"
    raise UsageError(f"diffusers:{folder}: not a diffusers folder (no model_index.json, config.json or unet/)")


# -- pixel models ----------------------------------------------------------------------------------
@dataclass
class PixelDiffusersModel:
    """A diffusers ``UNet2DModel`` with its noise schedule; called with schedule indices like ``ADMModel``."""

    net: Any
    diffusion: Any  # cfx_cli.diffusion.GaussianDiffusion
    scheduler: Any
    device: str = "cpu"
    dtype: Any = None
    source: str = ""
    info: dict = field(default_factory=dict)

    kind = "pixel"

    @property
    def image_size(self) -> int:
        size = self.net.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def learn_sigma(self) -> bool:
        return self.diffusion.variance_type == "learned_range"

    def with_respacing(self, respacing: str) -> PixelDiffusersModel:
        """The same network on a subset of the schedule's steps (guided-diffusion ``timestep_respacing``)."""
        return PixelDiffusersModel(
            self.net,
            self.diffusion.respaced(respacing),
            self.scheduler,
            self.device,
            self.dtype,
            self.source,
            dict(self.info),
        )

    def __call__(self, x, t, y=None):
        ts = self.diffusion.model_timesteps(t, batch=x.shape[0]).to(x.device)
        if ts.numel() == 1 and x.shape[0] > 1:
            ts = ts.expand(x.shape[0])
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


def load_pixel(
    folder: Path, device: str = "cpu", memory: MemoryOptions | None = None, source: str = ""
) -> PixelDiffusersModel:
    from diffusers import DDPMScheduler, UNet2DModel

    memory = memory or MemoryOptions()
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    missing = [f"{unet_dir.name}/{m}" for m in _missing_in(unet_dir, [("config.json",), DIFFUSERS_WEIGHTS])]
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
    return PixelDiffusersModel(
        net,
        diffusion_from_scheduler(scheduler, learned),
        scheduler,
        device,
        dtype,
        source or str(folder),
        {"parameters": sum(p.numel() for p in net.parameters())},
    )


def _missing_in(folder: Path, groups: list[tuple[str, ...]]) -> list[str]:
    return [" or ".join(g[:2]) for g in groups if not any((folder / f).is_file() for f in g)]


# -- latent text-to-image models -------------------------------------------------------------------
@dataclass
class LatentDiffusionModel:
    """Stable-Diffusion-style components. ``components`` names those loaded (a subset for tests/fixtures)."""

    vae: Any = None
    unet: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None
    device: str = "cpu"
    dtype: Any = None
    source: str = ""
    info: dict = field(default_factory=dict)

    kind = "latent"

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def alphas_cumprod(self):
        return self.scheduler.alphas_cumprod.double()

    def diffusion(self):
        return diffusion_from_scheduler(self.scheduler)

    def encode_prompt(self, prompts: list[str]):
        """Text-encoder hidden states (N, L, D) for prompts padded to the tokenizer's max length."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    def encode_images(self, images, sample: bool = False, generator=None):
        """Latents (mean, or a sample) × scaling factor for images in [-1, 1]."""
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.scaling_factor

    def decode(self, latents):
        """Images in [-1, 1] (float32) from scaled latents."""
        return self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    def eps(self, latents, t, embeddings):
        """The UNet's noise prediction at diffusers timesteps ``t`` (int or (N,)); v- and x_0-predicting UNets
        (SD 2.x 768-v) are converted to ε so samplers need one parametrisation."""
        out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype)).sample.float()
        if self.prediction_type == "epsilon":
            return out
        from cfx_cli.diffusion import broadcast

        ab = broadcast(self.alphas_cumprod, t, latents.float())
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * out + (1 - ab).sqrt() * latents.float()
        return (latents.float() - ab.sqrt() * out) / (1 - ab).sqrt()  # "sample": x_0 → ε


def load_latent(
    folder: Path,
    device: str = "cpu",
    memory: MemoryOptions | None = None,
    components: tuple[str, ...] = SD_COMPONENTS,
    source: str = "",
) -> LatentDiffusionModel:
    """Load Stable Diffusion 1.x/2.x components from a folder laid out as diffusers saves pipelines."""
    memory = memory or MemoryOptions()
    label = f"diffusers:{source or folder}"
    missing = missing_files(folder, components)
    if missing:
        raise UsageError(f"{label}: missing {', '.join(missing)} (in {folder})")
    dtype = resolve_dtype(device, memory.precision, label)
    model = LatentDiffusionModel(device=device, dtype=dtype, source=source or str(folder))
    try:
        if "vae" in components:
            from diffusers import AutoencoderKL

            model.vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype)
        if "unet" in components:
            from diffusers import UNet2DConditionModel

            model.unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype)
        if "text_encoder" in components:
            from transformers import CLIPTextModel

            model.text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype)
        if "tokenizer" in components:
            from transformers import CLIPTokenizer

            model.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        if "scheduler" in components:
            model.scheduler = load_scheduler(folder / "scheduler")
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{label}: cannot load ({type(exc).__name__}: {first})") from None
    for name in ("vae", "unet", "text_encoder"):
        mod = getattr(model, name)
        if mod is not None:
            mod.to(device).eval().requires_grad_(False)
            (apply_to_text_encoder if name == "text_encoder" else apply_to_diffusers)(mod, memory)
    model.info = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vae", "unet", "text_encoder")
        if getattr(model, name) is not None
    }
    return model


def load_scheduler(folder: Path):
    """The scheduler class named in ``scheduler_config.json`` (falling back to DDIM for unknown ones)."""
    import diffusers

    cfg = _read_json(folder / "scheduler_config.json")
    cls = getattr(diffusers, str(cfg.get("_class_name", "DDIMScheduler")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = diffusers.DDIMScheduler
    return cls.from_pretrained(str(folder))


def load_diffusers(
    spec: str, device: str = "cpu", memory: MemoryOptions | None = None, components: tuple[str, ...] | None = None
):
    """``diffusers:PATH_OR_HUB_ID`` → ``PixelDiffusersModel`` or ``LatentDiffusionModel``."""
    patterns = None
    if looks_like_hub_id(spec):  # fetch only what cfx loads (no fp16/ckpt duplicates, no safety checker)
        patterns = [
            "model_index.json",
            "*/config.json",
            "*/scheduler_config.json",
            "*/*.safetensors",
            "*/*.json",
            "*/*.txt",
            "config.json",
            "*.safetensors",
        ]
    folder = resolve_folder(spec, patterns)
    kind = folder_kind(folder)
    if kind == "pixel":
        return load_pixel(folder, device, memory, source=spec)
    return load_latent(folder, device, memory, components or SD_COMPONENTS, source=spec)
