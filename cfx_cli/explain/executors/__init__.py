"""Executors: where the batches of a run are explained (``--executor NAME``).

An executor checks the request before any work (:meth:`Executor.check`) and turns the batches into manifest
records (:meth:`Executor.run`); each record is appended to the run directory by the worker that made it. Every
executor builds its workers with :func:`cfx_cli.explain.batch.build_worker`, so a Ray actor explains exactly as
a local run does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TextIO

from cfx_cli.errors import UsageError
from cfx_cli.explain.executors.local import LocalExecutor
from cfx_cli.explain.executors.ray import RayExecutor

if TYPE_CHECKING:
    from cfx_cli.explain.batch import BatchWorker
    from cfx_cli.explain.request import ExplainPlan, ExplainRequest
    from cfx_cli.images import InputImage
    from cfx_cli.runs import Record


class Executor(Protocol):
    name: str

    def check(self, req: ExplainRequest) -> None:
        """Usage errors for this executor's options (``--workers``...) or a missing dependency."""

    def run(self, batches: list[list[InputImage]], worker: BatchWorker, plan: ExplainPlan,
            progress_stream: TextIO | None = None, initial: int = 0) -> Iterator[list[Record]]:
        """Explain ``batches`` (``worker`` is the driver's, already built and checked); yield each batch's
        records as it finishes. ``initial``: inputs a resumed run had done already (for the progress bar)."""


#: ``--executor NAME`` → executor
EXECUTORS: dict[str, Executor] = {e.name: e for e in (LocalExecutor(), RayExecutor())}


def get_executor(name: str) -> Executor:
    if name not in EXECUTORS:
        raise UsageError(f"--executor {name!r}: expected {' or '.join(EXECUTORS)}")
    return EXECUTORS[name]
