"""Typed, documented hyperparameters for explainers (``--set KEY=VALUE``) and their presets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cfx_cli.errors import UsageError

#: the kinds a :class:`Param` may have → (the Python value ``self.params[name]`` holds, what ``--set KEY=VALUE``
#: accepts); the plugin guide's table is generated from this (scripts/gen_plugin_docs.py)
KINDS: dict[str, tuple[str, str]] = {
    "int": ("int", "a whole number (`5`); in a TOML config an integer"),
    "float": ("float", "a number, or a fraction `A/B` (`8/255`); not NaN"),
    "bool": ("bool", "`true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`"),
    "str": ("str", "any text"),
    "floats": ("tuple[float, ...]", "a comma list of numbers (`8,10,15`); in a TOML config a list"),
}


@dataclass(frozen=True)
class Param:
    """One hyperparameter. ``kind``: a key of :data:`KINDS`. ``choices``: the allowed values (after conversion).
    ``min``/``max``: inclusive bounds for ``int``, ``float`` and each number of ``floats``. Every value — default,
    preset, ``--set`` — is checked before any work starts; a bad one is a one-line usage error."""

    name: str  # the key of --set KEY=VALUE and of self.params
    kind: str  # "int", "float", "bool", "str" or "floats" (KINDS)
    default: Any  # a value of the kind's Python type, within the bounds
    help: str  # one line for `cfx methods NAME`
    choices: tuple[Any, ...] | None = None  # the allowed values, e.g. ("l1", "l2"); None = any
    min: float | None = None  # inclusive lower bound (numbers); None = unbounded
    max: float | None = None  # inclusive upper bound (numbers); None = unbounded

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # a plugin author's mistake: say so at registration, not at use
            raise ValueError(f"Param {self.name!r}: unknown kind {self.kind!r} (kinds: {', '.join(KINDS)})")
        if (self.min is not None or self.max is not None) and self.kind not in ("int", "float", "floats"):
            raise ValueError(f"Param {self.name!r}: min/max apply to int, float and floats, not {self.kind}")

    def parse(self, raw: Any, *, where: str = "--set") -> Any:
        try:
            value = _convert(self.kind, raw)
        except (TypeError, ValueError, ZeroDivisionError):
            raise UsageError(
                f"{where} {self.name}={raw!r}: expected {self.kind}"
                + (f" (one of {', '.join(map(str, self.choices))})" if self.choices else "")
            ) from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{where} {self.name}={raw!r}: must be one of {', '.join(map(str, self.choices))}"
            )
        for number in (value if self.kind == "floats" else (value,) if self.kind in ("int", "float") else ()):
            if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
                raise UsageError(f"{where} {self.name}={raw!r}: must be {self.bounds()}")
        return value

    def bounds(self) -> str:
        """The allowed range in words (``>= 1``, ``in [0, 1]``), or '' when unbounded."""
        lo, hi = (_num(x) for x in (self.min, self.max))
        if self.min is not None and self.max is not None:
            return f"in [{lo}, {hi}]"
        if self.min is not None:
            return f">= {lo}"
        if self.max is not None:
            return f"<= {hi}"
        return ""


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:g}")


def _convert(kind: str, raw: Any) -> Any:
    if kind == "int":
        if isinstance(raw, bool):
            raise TypeError
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return int(raw)
    if kind == "float":
        if isinstance(raw, bool):
            raise TypeError
        if isinstance(raw, str) and "/" in raw:  # e.g. eps=8/255
            num, den = raw.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(raw)
        if math.isnan(value):
            raise ValueError
        return value
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if kind == "str":
        return str(raw)
    if kind == "floats":
        items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
        return tuple(_convert("float", x.strip() if isinstance(x, str) else x) for x in items)
    raise ValueError(f"unknown parameter kind {kind}")


def resolve_params(
    method: str,
    params: Sequence[Param],
    presets: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """Defaults, then the chosen ``preset``, then explicit overrides; unknown keys are usage errors."""
    by_name = {p.name: p for p in params}
    # the declared defaults are checked too: a plugin's out-of-range default fails here, before any work
    values = {p.name: p.default if p.default is None else p.parse(p.default, where=f"{method}: default")
              for p in params}
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise UsageError(f"method {method!r} has no preset {preset!r} (presets: {known})")
        for key, value in presets[preset].items():
            values[key] = by_name[key].parse(value, where=f"preset {preset}:")
        values["preset"] = preset
    for key, raw in overrides.items():
        if key not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise UsageError(f"method {method!r} has no parameter {key!r} (parameters: {known}, preset)")
        values[key] = by_name[key].parse(raw)
    return values


def parse_set_options(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if not key.strip():
            raise UsageError(f"--set {item!r}: empty key")
        out[key.strip()] = value.strip()
    return out
