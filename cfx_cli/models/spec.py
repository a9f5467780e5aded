"""``--model SPEC``: parse a generative-model spec and load it.

    demo:NAME                    an embedded demo generator (cfx_cli.demo.generators)
    diffusers:PATH_OR_HUB_ID     a UNet2DModel folder, or Stable Diffusion 1.x/2.x components
    adm:PATH.pt                  a guided-diffusion checkpoint, with --model-flags "…" or a flags file
    i2sb:PATH.pt                 an I2SB bridge checkpoint (ADM network + bridge schedule)

Loaded models: ``ADMModel`` / ``PixelDiffusersModel`` (kind "pixel"), ``LatentDiffusionModel`` ("latent"),
``BridgeModel`` ("bridge"), or whatever the demo module returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.models.memory import MemoryOptions

SCHEMES = ("demo", "diffusers", "adm", "i2sb")
DEMO_MODULE = "cfx_cli.demo.generators"


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
) -> Any:
    """Load ``spec``. ``expect`` (e.g. ``"pixel"``) makes a model of another kind a usage error."""
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
        from cfx_cli.models.adm import load_adm

        model = load_adm(rest, model_flags, device, trust_pickle, memory)
    elif scheme == "i2sb":
        from cfx_cli.models.i2sb import load_i2sb

        model = load_i2sb(rest, model_flags, device, trust_pickle, memory)
    elif scheme == "diffusers":
        from cfx_cli.models.diffusers_models import load_diffusers

        model = load_diffusers(rest, device, memory)
    else:
        model = load_demo(rest, device)
    if expect is not None:
        kinds = (expect,) if isinstance(expect, str) else tuple(expect)
        kind = getattr(model, "kind", None)
        if kind not in kinds:
            raise UsageError(f"--model {spec}: this method needs a {' or '.join(kinds)} model, got a {kind} model")
    return model


# -- embedded demo generators --------------------------------------------------------------------------
def _demo_module():
    import importlib

    try:
        return importlib.import_module(DEMO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == DEMO_MODULE:
            return None
        raise


def demo_models() -> dict[str, str]:
    """name → one-line summary of the demo generators this installation ships ({} when none)."""
    mod = _demo_module()
    if mod is None:
        return {}
    for attr in ("GENERATORS", "MODELS"):
        value = getattr(mod, attr, None)
        if isinstance(value, dict):
            return {
                str(k): (v if isinstance(v, str) else str(getattr(v, "summary", "") or "")) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return {str(k): "" for k in value}
    if callable(getattr(mod, "available", None)):
        return {str(k): "" for k in mod.available()}
    return {}


def load_demo(name: str, device: str = "cpu") -> Any:
    mod = _demo_module()
    if mod is None:
        raise UsageError(
            f"demo:{name}: the embedded demo generators are not installed in this build "
            f"({DEMO_MODULE} is missing); use diffusers:, adm: or i2sb: models"
        )
    names = demo_models()
    if names and name not in names:
        raise UsageError(f"demo:{name}: unknown demo generator (available: {', '.join('demo:' + n for n in names)})")
    loader = getattr(mod, "load", None) or getattr(mod, "load_generator", None)
    if loader is None:
        raise UsageError(f"demo:{name}: {DEMO_MODULE} has no load(name, device) function")
    try:
        return loader(name, device=device)
    except FileNotFoundError as exc:
        raise UsageError(
            f"demo:{name}: weights missing ({exc.filename or exc}); the demo generator has not "
            "been trained/committed in this build"
        ) from None


# -- for explainers ------------------------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}


def model_for(context, default: str, expect: str | tuple[str, ...] | None = None) -> Any:
    """The generative model an explainer should use: ``--model`` or the method's ``default`` spec (e.g. its demo
    model), loaded once per process for the same spec/flags/device, with the default memory options (fp32, the
    default attention, no gradient checkpointing: no command sets others).
    """
    memory = MemoryOptions()
    spec = context.model or default
    key = (
        spec,
        context.model_flags,
        context.device,
        context.trust_pickle,
        memory.precision,
        memory.attention,
        memory.gradient_checkpointing,
    )
    if key not in _CACHE:
        _CACHE[key] = load_model(spec, context.model_flags, context.device, context.trust_pickle, memory, expect)
    model = _CACHE[key]
    if expect is not None:
        kinds = (expect,) if isinstance(expect, str) else tuple(expect)
        if getattr(model, "kind", None) not in kinds:
            raise UsageError(
                f"--model {spec}: this method needs a {' or '.join(kinds)} model, "
                f"got a {getattr(model, 'kind', None)} model"
            )
    return model


def clear_model_cache() -> None:
    _CACHE.clear()
