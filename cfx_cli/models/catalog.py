"""What ``cfx models`` lists: the demo generators, the checkpoints the papers use (and whether they are in the
local Hugging Face cache), every cached diffusers model, and every cached transformers image classifier (``hf:``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cfx_cli.models.demo import demo_models, demo_module

#: the model each kind of method uses when ``--model`` is absent: the embedded demo generators
DEFAULT_MODELS = {"pixel": "demo:pixel", "latent": "demo:latent", "bridge": "demo:bridge"}
#: what each kind of model is, for errors that name what a method needs
KIND_HINTS = {
    "pixel": "an ADM checkpoint, a diffusers UNet2DModel folder or demo:pixel",
    "latent": "Stable Diffusion 1.x/2.x components (diffusers:FOLDER_OR_HUB_ID) or demo:latent",
    "bridge": "an I2SB checkpoint (i2sb:PATH.pt) or demo:bridge",
}


@dataclass
class KnownModel:
    name: str
    spec: str  # how to pass it to --model
    used_by: str
    source: str  # where it is published
    hub_id: str | None = None  # checked against the HF cache


KNOWN_MODELS = (
    KnownModel(
        "Stable Diffusion 1.4",
        "diffusers:CompVis/stable-diffusion-v1-4",
        "TIME, ECED",
        "https://huggingface.co/CompVis/stable-diffusion-v1-4",
        "CompVis/stable-diffusion-v1-4",
    ),
    KnownModel(
        "Stable Diffusion 1.5",
        "diffusers:stable-diffusion-v1-5/stable-diffusion-v1-5",
        "TIME, ECED",
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ),
    KnownModel(
        "Stable Diffusion 2.1 base",
        "diffusers:stabilityai/stable-diffusion-2-1-base",
        "TIME, ECED",
        "https://huggingface.co/stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2-1-base",
    ),
    KnownModel(
        "DDPM CelebA-HQ 256 (diffusers)",
        "diffusers:google/ddpm-celebahq-256",
        "DiME/ACE (pixel prior)",
        "https://huggingface.co/google/ddpm-celebahq-256",
        "google/ddpm-celebahq-256",
    ),
    KnownModel(
        "OpenAI ADM ImageNet 256 uncond",
        'adm:256x256_diffusion_uncond.pt --model-flags "--attention_'
        "resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
        '--resblock_updown True --use_fp16 True --use_scale_shift_norm True"',
        "ACE, DVCE (ImageNet)",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    ),
    KnownModel(
        "DiME CelebA ADM (128, 500 steps)",
        'adm:PATH/celeba-ddpm.pt --model-flags "--attention_resolutions '
        "32,16,8 --class_cond False --diffusion_steps 500 --learn_sigma True --noise_schedule linear "
        "--num_channels 128 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        '--use_scale_shift_norm True --image_size 128"',
        "DiME, ACE (CelebA)",
        "https://huggingface.co/guillaumejs2403/DiME (linked from github.com/guillaumejs2403/DiME)",
    ),
    KnownModel(
        "ACE CelebA-HQ ADM (256, 500 steps)",
        'adm:PATH/celebahq-ddpm.pt --model-flags "--attention_'
        "resolutions 32,16,8 --class_cond False --diffusion_steps 500 --learn_sigma True --noise_schedule "
        "linear --num_channels 128 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        '--use_fp16 True --use_scale_shift_norm True --image_size 256"',
        "ACE (CelebA-HQ)",
        "github.com/guillaumejs2403/ACE (README: pretrained models)",
    ),
    KnownModel(
        "I2SB inpaint freeform 20-30% (ImageNet 256)",
        "i2sb:results/inpaint-freeform2030/latest.pt --trust-pickle (options.pkl) or a JSON sidecar",
        "RCSB",
        "https://github.com/NVlabs/I2SB (scripts/download_checkpoint.sh inpaint-freeform2030)",
    ),
)


def _scan_cache():
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        return scan_cache_dir(), None
    except Exception as exc:  # CacheNotFound when the cache folder does not exist yet
        if type(exc).__name__ == "CacheNotFound":
            from huggingface_hub import constants

            return None, f"no Hugging Face cache at {constants.HF_HUB_CACHE}"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _diffusers_kind(repo) -> str:
    names = {f.file_name for rev in repo.revisions for f in rev.files}
    paths = {str(f.file_path) for rev in repo.revisions for f in rev.files}
    if "model_index.json" in names:
        return "latent" if any("text_encoder" in p or "/vae/" in p for p in paths) else "pixel"
    if "config.json" in names and any(n.startswith("diffusion_pytorch_model") for n in names):
        return "diffusers model"
    return ""


def _image_classifier(repo) -> dict | None:
    """Architecture and class count from the newest cached revision's config.json, if it is an
    ``*ForImageClassification`` (what ``hf:`` loads); None otherwise."""
    if not repo.revisions:
        return None
    newest = max(repo.revisions, key=lambda r: r.last_modified)
    try:
        config = json.loads((Path(newest.snapshot_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    archs = [a for a in (config.get("architectures") or []) if str(a).endswith("ForImageClassification")]
    if not archs:
        return None
    return {"architecture": archs[0], "num_labels": len(config.get("id2label") or {}) or config.get("num_labels")}


def _demo_dirs(name: str) -> list[Path]:
    """Where a demo generator's weights live: ``generators.model_dir(name)`` if the module says, else a guess."""
    mod = demo_module()
    finder = getattr(mod, "model_dir", None)
    if callable(finder):
        try:
            return [Path(finder(name))]
        except Exception:  # a missing/unknown model: no size to report
            return []
    demo_dir = Path(__file__).resolve().parents[1] / "demo"
    return [d for d in (demo_dir / "models" / name, demo_dir / name) if d.is_dir()]


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def collect() -> dict:
    """Everything ``cfx models`` shows, as plain data (also its ``--json`` output)."""
    demo = []
    for name, summary in demo_models().items():
        files = [f for d in _demo_dirs(name) for f in d.glob("**/*.safetensors")]
        demo.append(
            {
                "spec": f"demo:{name}",
                "summary": summary,
                "size_bytes": sum(f.stat().st_size for f in files),
                "source": "embedded (cfx_cli/demo)",
            }
        )
    cache, cache_error = _scan_cache()
    cached, classifiers = {}, []
    if cache is not None:
        for repo in cache.repos:
            if repo.repo_type != "model":
                continue
            found = _image_classifier(repo)
            if found:
                classifiers.append({"spec": f"hf:{repo.repo_id}", "hub_id": repo.repo_id, **found,
                                    "size_bytes": repo.size_on_disk, "path": str(repo.repo_path)})
            cached[repo.repo_id] = {
                "spec": f"diffusers:{repo.repo_id}",
                "hub_id": repo.repo_id,
                "kind": _diffusers_kind(repo),
                "size_bytes": repo.size_on_disk,
                "path": str(repo.repo_path),
            }
    known = []
    for km in KNOWN_MODELS:
        entry = asdict(km)
        entry["cached"] = bool(km.hub_id and km.hub_id in cached)
        entry["size_bytes"] = cached[km.hub_id]["size_bytes"] if entry["cached"] else None
        known.append(entry)
    return {
        "demo": demo,
        "known": known,
        "cached": sorted((c for c in cached.values() if c["kind"]), key=lambda c: c["hub_id"]),
        "classifiers": sorted(classifiers, key=lambda c: c["hub_id"]),
        "cache_error": cache_error,
    }


def describe(model, spec: str) -> dict:
    """A short summary of a loaded model (``cfx models SPEC``)."""
    info: dict = {
        "spec": spec,
        "kind": getattr(model, "kind", type(model).__name__),
        "class": type(model).__name__,
        "source": getattr(model, "source", ""),
    }
    if hasattr(model, "image_size"):
        info["image_size"] = model.image_size
    for key, value in (getattr(model, "info", None) or {}).items():
        info[key] = value
    if getattr(model, "diffusion", None) is not None:
        d = model.diffusion
        info["schedule"] = f"{d.num_steps} steps (of {d.original_num_steps}), variance {d.variance_type}"
    if getattr(model, "bridge", None) is not None:
        info["schedule"] = f"I2SB bridge, {model.bridge.interval} steps, options {model.options}"
    if getattr(model, "scheduler", None) is not None:
        info["scheduler"] = type(model.scheduler).__name__
    info["device"] = getattr(model, "device", "cpu")
    info["dtype"] = str(getattr(model, "dtype", "")).replace("torch.", "")
    return info


def render_text(data: dict) -> str:
    """`cfx models` as text: the demo models, the known checkpoints, the cached hub models and classifiers."""
    lines: list[str] = []

    def size(n: int | None) -> str:
        return human_size(n) if n else "–"

    lines.append("demo models (embedded, offline):")
    for d in data["demo"] or [{"spec": "(none in this build)", "size_bytes": None, "summary": ""}]:
        lines.append(f"  {d['spec']:28s} {size(d['size_bytes']):>9s}  {d['summary']}")
    lines.append("known checkpoints (--model SPEC):")
    for k in data["known"]:
        state = f"cached, {size(k['size_bytes'])}" if k["cached"] else ("not cached" if k["hub_id"] else "local file")
        lines.append(f"  {k['name']} [{k['used_by']}] ({state})\n      {k['spec']}\n      source: {k['source']}")
    lines.append("cached diffusers models (Hugging Face cache):")
    if data["cache_error"]:
        lines.append(f"  (none: {data['cache_error']})")
    elif not data["cached"]:
        lines.append("  (none)")
    for c in data["cached"]:
        lines.append(f"  {c['spec']:48s} {size(c['size_bytes']):>9s}  {c['kind']}  {c['path']}")
    lines.append("cached transformers image classifiers (--classifier hf:ORG/NAME):")
    if data["cache_error"] or not data["classifiers"]:
        lines.append("  (none)")
    for c in data["classifiers"]:
        lines.append(f"  {c['spec']:48s} {size(c['size_bytes']):>9s}  {c['architecture']}, {c['num_labels']} classes"
                     f"  {c['path']}")
    return "\n".join(lines)
