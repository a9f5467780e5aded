"""Local folders for Hugging Face hub ids: the folder itself, or the cached snapshot (no network when cached, none
at all with ``HF_HUB_OFFLINE=1``); anything missing is one line naming it and where it is published.

Used by ``diffusers:`` models and the transformers-based plugins (``hf:`` classifiers, ``--region clipseg:``);
light: huggingface_hub is imported only to resolve a hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

from cfx_cli.errors import UsageError

TRUTHY = ("1", "on", "yes", "true")
#: a transformers model's weights (one of them) and its processor's settings (one of them: transformers 5 saves a
#: combined processor as processor_config.json)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
#: what a snapshot of a transformers model needs (``allow_patterns``): configs, weights, tokenizer files
TRANSFORMERS_FILES = ["*.json", "*.safetensors", "*.bin", "*.txt"]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set (cfx then never tries a download)."""
    if any(os.environ.get(k, "").lower() in TRUTHY for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists()


def resolve_hub_folder(label: str, ref: str, what: str, allow_patterns: list[str] | None = None,
                       revision: str | None = None, how_else: str = "pass a local folder") -> Path:
    """``ref`` (a folder or an ``org/name`` hub id) → a local folder. ``label`` prefixes every message (e.g.
    ``hf:org/name``); ``what`` says what the folder holds; ``how_else`` is the alternative the messages offer."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{label}: expected a folder ({what}), found a file")
    if not looks_like_hub_id(ref):
        raise UsageError(f"{label}: no such folder (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{label}: not a local folder, and huggingface_hub is not installed to resolve hub ids") \
            from None
    published = f"https://huggingface.co/{ref}"
    try:
        return Path(snapshot_download(ref, revision=revision, local_files_only=True, allow_patterns=allow_patterns))
    except Exception as exc:  # LocalEntryNotFoundError & co: not (fully) cached
        cached_error = exc
    if offline():
        raise UsageError(
            f"{label}: no such local folder, and as a hub id not found in the Hugging Face cache ({cache_dir()}) "
            f"while HF_HUB_OFFLINE is set; {what} {ref} is published at {published}: download it once online "
            f"(`hf download {ref}`) or {how_else}"
        ) from None
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=allow_patterns))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(
            f"{label}: {what} {ref} is not cached and downloading it from {published} failed "
            f"({type(exc).__name__}: {first}); cache lookup said: {type(cached_error).__name__}"
        ) from None


def missing_in(folder: Path, groups: list[tuple[str, ...]]) -> list[str]:
    """One entry per group of alternatives (file names in ``folder``) of which none exists, naming its first two."""
    return [" or ".join(g[:2]) for g in groups if not any((folder / f).is_file() for f in g)]
