"""Progress reporting: a Rich bar with ETA on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

#: advances the ETA's rate is measured over: recent batches, so that a slow start (models warming up, a first
#: batch that compiles) or a change of pace does not skew it
ETA_WINDOW = 8


class EtaEstimator:
    """Remaining time from the pace of the most recent advances.

    The first advance includes everything before it (lazy model loading, warm-up, the first compile), so the
    rate is measured between advances once there are two; with one advance only it is a rough estimate from
    the start. Items that were done before this session (``initial``, a resumed run) do not count as pace.
    """

    def __init__(self, total: int, initial: int = 0, clock=time.monotonic) -> None:
        self.total, self.clock = total, clock
        self.origin = (clock(), initial)
        self.advances: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW + 1)

    def update(self, done: int) -> None:
        self.advances.append((self.clock(), done))

    def seconds_left(self) -> float | None:
        """None until there is something to go on."""
        if not self.advances:
            return None
        # one advance: from the start; more: between advances, leaving out the start-up before the first
        (t0, d0), (t1, d1) = (self.origin if len(self.advances) == 1 else self.advances[0]), self.advances[-1]
        if d1 <= d0 or t1 <= t0:
            return None
        return max(0.0, (self.total - d1) * (t1 - t0) / (d1 - d0))

    def text(self) -> str:
        left = self.seconds_left()
        if left is None:
            return "?"
        left = round(left)
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600 else (
            f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s")


class Progress:
    """``total`` counts every item of the job; ``initial`` of them were done before (a resumed run), so the bar
    starts there and the ETA counts only this session's pace."""

    def __init__(self, description: str, total: int, stream: TextIO | None = None,
                 interactive: bool | None = None, initial: int = 0) -> None:
        self.description = description
        self.total = total
        self.done = initial
        self.stream = stream or sys.stderr
        if interactive is None:  # a bar only when a person is watching; plain lines in logs and CI
            interactive = self.stream.isatty() and sys.stdout.isatty()
        self.interactive = interactive
        self.start = time.monotonic()
        self.eta = EtaEstimator(total, initial)
        self._last_line = 0.0
        self._rich = None
        self._task = None
        self.info = ""  # e.g. the current loss, shown after the counts

    def __enter__(self) -> Progress:
        if self.interactive and self.total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, completed=self.done, info="",
                                             eta="?")
        return self

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        self.eta.update(self.done)
        if info is not None:
            self.info = info
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, info=self.info, eta=self.eta.text())
            return
        now = time.monotonic()
        # plain mode: a line at most every 2 s, and always the last one
        if self.done >= self.total or now - self._last_line >= 2.0:
            self._last_line = now
            elapsed = now - self.start
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"{self.description}: {self.done}/{self.total} ({pct:.0f}%) "
                  f"elapsed {elapsed:.0f}s eta {self.eta.text()}" + (f" {self.info}" if self.info else ""),
                  file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
