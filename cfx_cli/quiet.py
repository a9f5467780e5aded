"""Keep the command line's output cfx's own: third-party chatter (diffusers' "install accelerate" hint, library
log lines, Python warnings raised inside libraries, loading bars) is silenced unless ``CFX_DEBUG=1``.

cfx's own lines are the ones it prints itself — ``note: …``, ``warning: …``, ``error: …``, ``skipped …``,
``resuming: …``, the progress lines and the summaries; nothing of cfx goes through :mod:`warnings` or a library's
logger, so silencing those loses nothing cfx meant to say. Nothing here imports a heavy library.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: environment read by the libraries when they first configure their loggers (a user's own setting wins)
LIBRARY_ENV = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def debug_enabled() -> bool:
    return os.environ.get("CFX_DEBUG") == "1"


def configure_cli_output() -> None:
    """Called once by the CLI entry point, before any library is imported. A no-op with ``CFX_DEBUG=1``."""
    if debug_enabled():
        return
    for key, value in LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.warnoptions:  # -W / PYTHONWARNINGS given by the user: theirs to decide
        warnings.simplefilter("ignore")
    root = logging.getLogger()
    if not root.handlers:  # otherwise logging's last-resort handler prints every library WARNING to stderr
        root.addHandler(logging.NullHandler())
    quiet_loaded_libraries()


def quiet_loaded_libraries() -> None:
    """Silence diffusers'/transformers' loggers and loading bars if they are imported (call after importing them;
    their verbosity environment only counts when it is set before the import)."""
    if debug_enabled():
        return
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(name)
        utils_logging = getattr(getattr(module, "utils", None), "logging", None)
        if utils_logging is not None:
            utils_logging.set_verbosity_error()
            utils_logging.disable_progress_bar()
