"""Plugin discovery and the registries of explainers, classifier adapters and metrics.

Built-in plugins live in the ``cfx`` distribution and are found through the same ``cfx``
entry-point group as third-party ones. Loading never raises: a plugin that fails to import
or registers a duplicate name is recorded in :func:`load_errors` and reported by ``cfx plugins``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from cfx_cli import hookspecs

BUILTIN_DISTRIBUTION = "cfx"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    error: str | None = None
    explainers: list[str] = field(default_factory=list)
    classifier_adapters: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    region_sources: list[str] = field(default_factory=list)


@dataclass
class Registry:
    explainers: dict[str, tuple[type, str]] = field(default_factory=dict)
    classifier_adapters: dict[str, tuple[type, str]] = field(default_factory=dict)
    metrics: dict[str, tuple[type, str]] = field(default_factory=dict)
    region_sources: dict[str, tuple[type, str]] = field(default_factory=dict)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None


def _allowed() -> set[str] | None:
    raw = os.environ.get("CFX_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed entry point loaded."""
    global _pm
    if _pm is not None:
        return _pm
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    allowed = _allowed()
    eps = importlib.metadata.entry_points(group=hookspecs.PROJECT)
    # built-ins first, so a third-party plugin can never take over a built-in name
    for ep in sorted(eps, key=lambda e: (e.dist is None or e.dist.name != BUILTIN_DISTRIBUTION)):
        dist = ep.dist.name if ep.dist else "?"
        builtin = dist == BUILTIN_DISTRIBUTION
        # CFX_LOAD_PLUGINS restricts third-party plugins only; the built-ins are the tool itself.
        if not builtin and allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        info = PluginInfo(
            name=ep.name,
            distribution=dist,
            version=ep.dist.version if ep.dist else "?",
            module=ep.value,
            builtin=builtin,
        )
        infos[ep.name] = info
        if pm.has_plugin(ep.name):
            info.error = f"entry point name {ep.name!r} is already used by another plugin"
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must never break the CLI
            info.error = f"{type(exc).__name__}: {exc}"
    pm._cfx_infos = infos  # type: ignore[attr-defined]
    _pm = pm
    return pm


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def get_registry(warn: bool = True) -> Registry:
    """Call every plugin's register hooks once and return what they registered.

    Problems (import failures, duplicate names) are collected in ``errors`` and, with ``warn``,
    printed once as one-line warnings on stderr.
    """
    global _registry
    if _registry is not None:
        return _registry
    pm = get_plugin_manager()
    infos: dict[str, PluginInfo] = dict(getattr(pm, "_cfx_infos", {}))
    reg = Registry()

    for hook_name, table, key_attr, info_attr in (
        ("register_explainers", reg.explainers, "name", "explainers"),
        ("register_classifier_adapters", reg.classifier_adapters, "schemes", "classifier_adapters"),
        ("register_metrics", reg.metrics, "name", "metrics"),
        ("register_region_sources", reg.region_sources, "scheme", "region_sources"),
    ):
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order: the first plugin to claim a name keeps it
            plugin_name = impl.plugin_name
            info = infos.setdefault(
                plugin_name,
                PluginInfo(plugin_name, "(registered in-process)", "", repr(impl.plugin), builtin=False),
            )

            def register(cls: Any, _plugin: str = plugin_name, _info: PluginInfo = info,
                         _table: dict = table, _key: str = key_attr, _attr: str = info_attr) -> None:
                keys = getattr(cls, _key)
                for key in [keys] if isinstance(keys, str) else list(keys):
                    if key in _table:
                        other = _table[key][1]
                        msg = (f"plugin {_plugin!r} tried to register {_attr[:-1].replace('_', ' ')} "
                               f"{key!r}, already registered by plugin {other!r}; refused")
                        reg.errors.append(msg)
                        _info.error = msg if _info.error is None else _info.error
                        continue
                    _table[key] = (cls, _plugin)
                    getattr(_info, _attr).append(key)

            try:
                impl.function(register=register)
            except Exception as exc:
                msg = f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                info.error = msg
                reg.errors.append(msg)

    for info in infos.values():
        if info.error and not any(info.error in e for e in reg.errors):
            reg.errors.append(f"plugin {info.name!r} ({info.distribution}) failed to load: {info.error}")
    reg.plugins = infos
    _registry = reg
    if warn:
        for msg in reg.errors:
            _warn(msg)
    return reg


def reset() -> None:
    """Forget loaded plugins (tests use this after registering throw-away plugins)."""
    global _pm, _registry
    _pm = None
    _registry = None


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin object (tests, notebooks) and rebuild the registries."""
    global _registry
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    _registry = None
