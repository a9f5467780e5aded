"""Classifier spec options: a trailing ``#key=value&key=value`` on any spec (``onnx:m.onnx#logits=1&size=32``).

Adapters declare theirs as :class:`Option` entries and read them with :func:`resolve_options`; the options every adapter
accepts (``#binary``, ``#attribute``: :mod:`cfx_cli.classifiers`) are taken off the spec before the adapter sees it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cfx_cli.errors import UsageError

_OPTIONS_RE = re.compile(r"#([A-Za-z_][A-Za-z0-9_]*=[^&#]*(?:&[A-Za-z_][A-Za-z0-9_]*=[^&#]*)*)$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One adapter option: settable as ``SPEC#name=value`` or through the environment variable ``env``."""

    name: str
    kind: str  # "float" | "int" | "bool" | "str" | "size" | "floats"
    default: Any
    help: str
    env: str | None = None


#: the options every classifier spec accepts: :func:`cfx_cli.classifiers.load_classifier` takes them off the spec
#: and presents the model's sigmoid output(s) as two classes (the published CelebA/BDD classifiers)
OUTPUT_OPTIONS = (
    Option("binary", "bool", False, "the model returns one logit l per image (l > 0: class 1); cfx presents two "
                                    "classes with probabilities (1 − σ(l), σ(l)) and logits (−l/2, l/2)"),
    Option("attribute", "str", None, "explain one output (an index or a name from --labels or the model's names) "
                                     "of a multi-label sigmoid model as two classes not-NAME / NAME"),
)


def split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``onnx:m.onnx#logits=1&size=32`` → (``onnx:m.onnx``, {"logits": "1", "size": "32"})."""
    m = _OPTIONS_RE.search(spec)
    if not m:
        return spec, {}
    raw: dict[str, str] = {}
    for pair in m.group(1).split("&"):
        key, value = pair.split("=", 1)
        raw[key.lower()] = value
    return spec[: m.start()], raw


def resolve_options(spec: str, raw: Mapping[str, str], known: tuple[Option, ...],
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Spec options override environment variables, which override defaults; bad values are usage errors."""
    environ = os.environ if environ is None else environ
    by_name = {o.name: o for o in known}
    unknown = sorted(set(raw) - set(by_name))
    if unknown:
        names = ", ".join(o.name for o in known + OUTPUT_OPTIONS)
        raise UsageError(f"classifier {spec}: unknown option(s) {', '.join(unknown)} (known: {names})")
    out: dict[str, Any] = {}
    for opt in known:
        if opt.name in raw:
            text, where = raw[opt.name], f"option {opt.name}"
        elif opt.env and environ.get(opt.env, "") != "":
            text, where = environ[opt.env], f"environment variable {opt.env}"
        else:
            out[opt.name] = opt.default
            continue
        out[opt.name] = _convert(opt, text, f"classifier {spec}: {where}={text!r}")
    return out


def _convert(opt: Option, text: str, where: str) -> Any:
    t = text.strip()
    try:
        if opt.kind == "bool":
            if t.lower() in _TRUE:
                return True
            if t.lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if opt.kind == "int":
            v = int(t)
            if v < 0:
                raise ValueError("must not be negative")
            return v
        if opt.kind == "float":
            v = float(t)
            if not v >= 0:
                raise ValueError("must be a non-negative number")
            return v
        if opt.kind == "size":
            parts = [int(p) for p in re.split(r"[x,]", t.lower())]
            if len(parts) == 1:
                parts *= 2
            if len(parts) != 2 or min(parts) < 1:
                raise ValueError("expected N or HxW")
            return (parts[0], parts[1])
        if opt.kind == "floats":
            vals = [float(p) for p in t.split(",")]
            if len(vals) not in (1, 3):
                raise ValueError("expected 1 or 3 comma-separated numbers")
            return tuple(vals * 3 if len(vals) == 1 else vals)
        return t
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
