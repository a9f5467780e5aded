"""``diffusers:`` specs: hub-id/folder resolution, the files each component needs, and what a folder holds.

A spec is a local folder or a Hugging Face hub id. Hub ids resolve through the local HF cache first (no network
when cached, none at all with ``HF_HUB_OFFLINE=1``). Every required file is checked before anything loads so a
missing one fails in one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from cfx_cli.errors import UsageError
from cfx_cli.hub import TRANSFORMERS_WEIGHTS as HUB_TRANSFORMERS_WEIGHTS
from cfx_cli.hub import looks_like_hub_id, missing_in, resolve_hub_folder  # noqa: F401 - re-exported

# weight file names, in the order they are preferred
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
)
TRANSFORMERS_WEIGHTS = (*HUB_TRANSFORMERS_WEIGHTS, "model.fp16.safetensors")  # SD folders may hold fp16 only
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


def resolve_folder(spec: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder for a ``diffusers:`` spec: the folder itself, or the cached snapshot of a hub id."""
    return resolve_hub_folder(f"diffusers:{spec}", spec, "a diffusers model or pipeline", allow_patterns)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc})") from None


def folder_kind(folder: Path) -> str:
    """``latent`` (Stable Diffusion components), ``pixel`` (UNet2DModel), or raise naming what is missing."""
    index = folder / "model_index.json"
    if index.is_file():
        info = read_json(index)
        if "text_encoder" in info or "vae" in info:
            return "latent"
        if "unet" in info:
            return "pixel"
    if (folder / "config.json").is_file():
        cls = read_json(folder / "config.json").get("_class_name", "")
        if cls == "UNet2DModel":
            return "pixel"
        raise UsageError(
            f"diffusers:{folder}: config.json describes a {cls or 'model of unknown class'}; expected "
            "a UNet2DModel folder or a pipeline folder with model_index.json"
        )
    if (folder / "unet").is_dir():
        unet_cfg = folder / "unet" / "config.json"
        if unet_cfg.is_file() and read_json(unet_cfg).get("_class_name") == "UNet2DModel":
            return "pixel"
        return "latent"
    raise UsageError(f"diffusers:{folder}: not a diffusers folder (no model_index.json, config.json or unet/)")


# what a hub download fetches: only what cfx loads (no fp16/ckpt duplicates, no safety checker)
HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/scheduler_config.json",
    "*/*.safetensors",
    "*/*.json",
    "*/*.txt",
    "config.json",
    "*.safetensors",
]
