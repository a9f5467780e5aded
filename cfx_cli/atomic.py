"""Atomic file writes: a temporary file in the target's folder, flushed and fsynced, then renamed over the target,
so a reader (or a resumed run after a crash) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None,
                 perms: int | None = 0o644) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``, on an error it is
    removed. ``perms``: the file's permission bits (mkstemp makes 0600; run directories are meant to be shared
    and served); None = what the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        if perms is None:
            umask = os.umask(0)
            os.umask(umask)
            perms = 0o666 & ~umask
        os.fchmod(fd, perms)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
