"""Atomic file writes: a temporary file in the target's folder, flushed and fsynced, then renamed over the target,
so a reader (or a resumed run after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _create_temp(folder: Path, suffix: str) -> tuple[int, Path]:
    """A new, exclusively created ``.tmp-*`` file in ``folder``. Unlike ``mkstemp`` (always 0600) it is created
    with mode 0666 so that the kernel applies the process's umask: under umask 022 the finished file is 0644,
    like any file the user creates, and a run directory can be shared or served."""
    for _ in range(100):
        tmp = folder / f".tmp-{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: could not create a temporary file")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``, on an error it is
    removed. The file's permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.suffix)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
