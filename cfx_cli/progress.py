"""Progress reporting: a Rich bar with ETA on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, description: str, total: int, stream: TextIO | None = None,
                 interactive: bool | None = None) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        if interactive is None:  # a bar only when a person is watching; plain lines in logs and CI
            interactive = self.stream.isatty() and sys.stdout.isatty()
        self.interactive = interactive
        self.start = time.monotonic()
        self._last_line = 0.0
        self._rich = None
        self._task = None
        self.info = ""  # e.g. the current loss, shown after the counts

    def __enter__(self) -> Progress:
        if self.interactive and self.total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, info="")
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, info=self.info)
            return
        now = time.monotonic()
        # plain mode: a line at most every 2 s, and always the last one
        if self.done >= self.total or now - self._last_line >= 2.0:
            self._last_line = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta_s = f"{eta:.0f}s" if eta == eta else "?"
            print(f"{self.description}: {self.done}/{self.total} ({pct:.0f}%) "
                  f"elapsed {elapsed:.0f}s eta {eta_s}" + (f" {self.info}" if self.info else ""),
                  file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
