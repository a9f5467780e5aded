"""``demo:NAME``: the embedded demo generators (``cfx_cli.demo.generators``), when this build ships them."""

from __future__ import annotations

import importlib
from typing import Any

from cfx_cli.errors import UsageError

DEMO_MODULE = "cfx_cli.demo.generators"


def demo_module():
    try:
        return importlib.import_module(DEMO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == DEMO_MODULE:
            return None
        raise


def demo_models() -> dict[str, str]:
    """name → one-line summary of the demo generators this installation ships ({} when none)."""
    mod = demo_module()
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
    mod = demo_module()
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
