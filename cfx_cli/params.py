"""Typed, documented hyperparameters for explainers (``--set KEY=VALUE``) and their presets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cfx_cli.errors import UsageError


@dataclass(frozen=True)
class Param:
    """One hyperparameter: ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``floats`` (comma list)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def parse(self, raw: Any, *, where: str = "--set") -> Any:
        try:
            value = _convert(self.kind, raw)
        except (TypeError, ValueError):
            raise UsageError(
                f"{where} {self.name}={raw!r}: expected {self.kind}"
                + (f" (one of {', '.join(map(str, self.choices))})" if self.choices else "")
            ) from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"{where} {self.name}={raw!r}: must be one of {', '.join(map(str, self.choices))}"
            )
        return value


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
            return float(num) / float(den)
        return float(raw)
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
    values = {p.name: p.default for p in params}
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
