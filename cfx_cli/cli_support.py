"""What the commands of :mod:`cfx_cli.cli` share besides the commands themselves: the ``--config`` TOML file,
the checks of the explain command's run options, and the command groups that add the plugins' commands.

Plugin commands (the ``register_commands`` hook) are loaded only when they are needed: for a command name that
is not a core one, for ``cfx fit ...`` and for ``cfx plugins``. Loading the plugins imports their modules
(numpy, PIL), and ``cfx --help`` must stay fast and import neither.
"""

from __future__ import annotations

import click
import typer
import typer.main
from typer.core import TyperGroup

from cfx_cli.backends.base import BACKENDS, PRECISIONS
from cfx_cli.errors import UsageError
from cfx_cli.plugins import register_commands

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def load_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: invalid TOML ({exc})") from None


def check_compile(enabled: bool, mode: str) -> bool | str:
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile-mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode != "default" and not enabled:
        raise UsageError("--compile-mode needs --compile")
    return (mode if mode != "default" else True) if enabled else False


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise UsageError(f"--precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return name


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UsageError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def show(value) -> str:
    """A parameter value as ``cfx methods`` prints it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(show(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


_loaded: tuple[dict[str, click.Command], dict[str, click.Command]] | None = None


def plugin_commands(ctx: click.Context) -> tuple[dict[str, click.Command], dict[str, click.Command]]:
    """(``cfx NAME`` commands, ``cfx fit NAME`` commands) that the plugins add, loaded once; ``ctx`` is any
    context of this command line (its root group's commands are the core ones, which no plugin can take)."""
    global _loaded
    if _loaded is None:
        root, fit = typer.Typer(), typer.Typer()
        core = ctx.find_root().command
        register_commands(root, fit, reserved=set(getattr(core, "commands", {})))
        _loaded = dict(typer.main.get_group(root).commands), dict(typer.main.get_group(fit).commands)
    return _loaded


class RootGroup(TyperGroup):
    """``cfx``: the core commands, then (only for a name that is none of them) the plugins' commands."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or plugin_commands(ctx)[0].get(cmd_name)


class FitGroup(TyperGroup):
    """``cfx fit``: the learning stages, all of them added by plugins (TIME: ``cfx fit time``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(plugin_commands(ctx)[1]))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or plugin_commands(ctx)[1].get(cmd_name)
