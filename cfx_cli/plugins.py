"""Plugin discovery and the one registry of explainers, classifier adapters, metrics and region sources.

Built-in plugins live in the ``cfx`` distribution and are found through the same ``cfx``
entry-point group as third-party ones. Loading never raises: a plugin that fails to import,
registers a duplicate name or fails in a hook is recorded in :attr:`Registry.errors` and reported by
``cfx plugins``. Every lookup (``--method``, ``--classifier SCHEME:``, ``--metrics``, ``--region``) goes
through :func:`get_registry`, so what ``cfx plugins`` lists is exactly what the commands use.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from cfx_cli import hookspecs
from cfx_cli.errors import UsageError

if TYPE_CHECKING:
    import typer

    from cfx_cli.explainers import Explainer

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
    commands: list[str] = field(default_factory=list)


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
#: problems met by :func:`register_commands` (it runs before the registry is built): (plugin, message)
_command_errors: list[tuple[str, str]] = []
#: commands each plugin added through ``register_commands``
_commands: dict[str, list[str]] = {}


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
                    if not key:
                        msg = f"plugin {_plugin!r} tried to register a {_attr[:-1].replace('_', ' ')} without {_key}"
                        reg.errors.append(msg)
                        _info.error = msg if _info.error is None else _info.error
                        continue
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

    for plugin_name, msg in _command_errors:
        reg.errors.append(msg)
        if plugin_name in infos and infos[plugin_name].error is None:
            infos[plugin_name].error = msg
    for plugin_name, names in _commands.items():
        if plugin_name in infos:
            infos[plugin_name].commands = list(names)
    for info in infos.values():
        if info.error and not any(info.error in e for e in reg.errors):
            reg.errors.append(f"plugin {info.name!r} ({info.distribution}) failed to load: {info.error}")
    reg.plugins = infos
    _registry = reg
    if warn:
        for msg in reg.errors:
            _warn(msg)
    return reg


def get_explainer_class(method: str) -> type[Explainer]:
    """The explainer registered as ``method``, or a usage error naming the installed ones."""
    explainers = get_registry().explainers
    if method not in explainers:
        known = ", ".join(sorted(explainers)) or "none"
        raise UsageError(f"unknown method {method!r} (installed: {known})")
    return explainers[method][0]


def black_box_methods() -> list[str]:
    """The installed methods that need only the classifier's probabilities."""
    return sorted(n for n, (cls, _) in get_registry().explainers.items() if "gradients" not in cls.requires)


def _command_entries(cli: typer.Typer, fit: typer.Typer) -> list[tuple[str, list, Any]]:
    """(the command's name as typed after ``cfx``, the list holding its registration, the registration)."""
    out = []
    for app, prefix in ((cli, ""), (fit, "fit ")):
        out += [(prefix + (c.name or c.callback.__name__.replace("_", "-")), app.registered_commands, c)
                for c in app.registered_commands]
        out += [(prefix + (g.name or ""), app.registered_groups, g) for g in app.registered_groups]
    return out


def register_commands(cli: typer.Typer, fit: typer.Typer, reserved: set[str] | frozenset[str] = frozenset()) -> None:
    """Let every plugin add its commands (the ``register_commands`` hook): to ``cli`` (``cfx NAME``) or to the
    ``fit`` group (``cfx fit NAME``, a method's learning stage). ``reserved`` are the core commands' names. As
    for every other registration, the first plugin to claim a name keeps it; a failing plugin is recorded, never
    raised."""
    hook = get_plugin_manager().hook.register_commands
    taken = set(reserved)
    for impl in hook.get_hookimpls():
        known = {id(entry) for _, _, entry in _command_entries(cli, fit)}
        values = {"cli": cli, "fit": fit}
        try:
            impl.function(**{name: values[name] for name in impl.argnames})
        except Exception as exc:  # a broken plugin must never break the CLI
            _command_errors.append((impl.plugin_name, f"plugin {impl.plugin_name!r} failed in register_commands: "
                                                      f"{type(exc).__name__}: {exc}"))
            continue
        for name, holder, entry in _command_entries(cli, fit):
            if id(entry) in known:
                continue
            if name in taken:
                holder.remove(entry)
                _command_errors.append((impl.plugin_name, f"plugin {impl.plugin_name!r} tried to register command "
                                                          f"{name!r}, which is taken; refused"))
                continue
            taken.add(name)
            _commands.setdefault(impl.plugin_name, []).append(name)


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
