"""``--model SPEC``: parse a generative-model spec and load it — the one loader of the model layer.

    demo:NAME                    an embedded demo generator (cfx_cli.demo.generators)
    diffusers:PATH_OR_HUB_ID     a UNet2DModel folder, or Stable Diffusion 1.x/2.x components
    adm:PATH.pt                  a guided-diffusion checkpoint, with --model-flags "…" or a flags file
    i2sb:PATH.pt                 an I2SB bridge checkpoint (ADM network + bridge schedule)

Loaded models: ``PixelModel`` (kind "pixel"), ``LatentModel`` ("latent"), ``BridgeModel`` ("bridge"), whichever
scheme they come from. Explainers call :func:`model_for` (cached per process) with the kind they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.models.catalog import DEFAULT_MODELS, KIND_HINTS
from cfx_cli.models.demo import load_demo
from cfx_cli.models.folders import HUB_PATTERNS, SD_COMPONENTS, folder_kind, looks_like_hub_id, resolve_folder
from cfx_cli.models.latent import load_latent
from cfx_cli.models.memory import MemoryOptions
from cfx_cli.models.pixel import load_pixel

SCHEMES = ("demo", "diffusers", "adm", "i2sb")


def parse_model_spec(spec: str) -> tuple[str, str]:
    scheme, sep, rest = (spec or "").partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise UsageError(f"--model {spec!r}: expected demo:NAME, diffusers:PATH_OR_HUB_ID, adm:PATH.pt or i2sb:PATH.pt")
    return scheme, rest


def load_model(
    spec: str,
    model_flags: str | None = None,
    device: str = "cpu",
    trust_pickle: bool = False,
    memory: MemoryOptions | None = None,
    expect: str | tuple[str, ...] | None = None,
    method: str = "this method",
) -> Any:
    """Load ``spec`` (uncached). ``expect`` (e.g. ``"pixel"``) makes a model of another kind a usage error."""
    scheme, rest = parse_model_spec(spec)
    if scheme in ("adm", "i2sb") and not Path(rest).expanduser().is_file():  # before anything about its flags
        what = "no such file" if not Path(rest).expanduser().exists() else "not a file"
        raise UsageError(f"--model {spec}: {Path(rest).expanduser()}: {what}")
    if scheme == "adm":
        if not model_flags:
            raise UsageError(
                f"--model {spec}: ADM checkpoints need --model-flags (the MODEL_FLAGS string the "
                "network was trained with, or a JSON/TOML/flags file)"
            )
        from cfx_cli.models.adm import load_adm  # torch at import

        model = load_adm(rest, model_flags, device, trust_pickle, memory)
    elif scheme == "i2sb":
        from cfx_cli.models.i2sb import load_i2sb  # torch at import

        model = load_i2sb(rest, model_flags, device, trust_pickle, memory)
    elif scheme == "diffusers":
        model = load_diffusers(rest, device, memory)
    else:
        model = load_demo(rest, device)
    check_kind(model, spec, expect, method)
    if hasattr(model, "spec"):
        model.spec = spec
    return model


def check_kind(model: Any, spec: str, expect: str | tuple[str, ...] | None, method: str = "this method") -> None:
    if expect is None:
        return
    kinds = (expect,) if isinstance(expect, str) else tuple(expect)
    kind = getattr(model, "kind", None)
    if kind not in kinds:
        what = "; ".join(f"a {k} model is {KIND_HINTS[k]}" for k in kinds if k in KIND_HINTS)
        raise UsageError(f"--model {spec}: {method} needs a {' or '.join(kinds)} model, got a {kind} model"
                         + (f" ({what})" if what else ""))


def load_diffusers(
    spec: str, device: str = "cpu", memory: MemoryOptions | None = None, components: tuple[str, ...] | None = None
):
    """``diffusers:PATH_OR_HUB_ID`` → ``PixelModel`` (a UNet2DModel) or ``LatentModel`` (SD components)."""
    folder = resolve_folder(spec, HUB_PATTERNS if looks_like_hub_id(spec) else None)
    if folder_kind(folder) == "pixel":
        return load_pixel(folder, device, memory, source=spec)
    return load_latent(folder, device, memory, components or SD_COMPONENTS, source=spec)


# -- for explainers ------------------------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}


def model_for(context, kind: str, method: str = "this method", spec: str | None = None, fresh: bool = False) -> Any:
    """The ``kind`` model ("pixel", "latent", "bridge") an explainer uses: ``spec``, else ``--model``, else the
    kind's default (:data:`cfx_cli.models.catalog.DEFAULT_MODELS`), loaded once per process for the same
    spec/flags/device. ``fresh`` loads a private copy (for a method that changes the model, as TIME installs its
    tokens into the text encoder). The memory options are the defaults (fp32, the default attention, no gradient
    checkpointing): no command sets others. A latent model works at the method's ``--set resolution=`` when it
    declares that parameter (:data:`cfx_cli.models.latent.RESOLUTION_PARAM`).
    """
    memory = MemoryOptions()
    spec = spec or context.model or DEFAULT_MODELS[kind]
    args = (spec, context.model_flags, context.device, context.trust_pickle, memory)
    if fresh:
        model = load_model(*args, expect=kind, method=method)
    else:
        key = (*args[:4], memory.precision, memory.attention, memory.gradient_checkpointing)
        if key not in _CACHE:
            _CACHE[key] = load_model(*args, expect=kind, method=method)
        model = _CACHE[key]
        check_kind(model, spec, kind, method)
    if kind == "latent" and (context.params or {}).get("resolution"):
        model = model.with_resolution(int(context.params["resolution"]), method)
    return model


def pixel_prior(context, respacing: str, method: str) -> tuple[Any, str]:
    """The pixel diffusion model of ``--model`` (or the demo DDPM) on ``respacing`` of its original schedule, and
    its spec (DiME, ACE).

    ``respacing`` uses guided-diffusion's ``timestep_respacing`` syntax (``"200"``, ``"ddim50"``); ``""`` keeps
    the schedule as loaded (for ADM checkpoints, the flags' ``--timestep_respacing``)."""
    model = model_for(context, "pixel", method)
    if respacing:
        try:
            model = model.with_respacing(respacing)
        except ValueError as exc:
            raise UsageError(f"{method}: --set respacing={respacing!r}: {exc}") from None
    return model, model.spec


def clear_model_cache() -> None:
    _CACHE.clear()
