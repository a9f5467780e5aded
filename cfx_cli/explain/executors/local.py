"""``--executor local`` (the default): the batches one after the other in this process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from cfx_cli.progress import Progress

if TYPE_CHECKING:
    from cfx_cli.explain.batch import BatchWorker
    from cfx_cli.explain.request import ExplainPlan, ExplainRequest
    from cfx_cli.images import InputImage
    from cfx_cli.runs import Record


class LocalExecutor:
    name = "local"

    def check(self, req: ExplainRequest) -> None:
        """Nothing to check: the local executor has no options."""

    def run(self, batches: list[list[InputImage]], worker: BatchWorker, plan: ExplainPlan,
            progress_stream: TextIO | None = None, initial: int = 0) -> Iterator[list[Record]]:
        total = initial + sum(map(len, batches))  # a resumed run's bar counts from the inputs already done
        with Progress(f"explain ({plan.method})", total, stream=progress_stream, initial=initial) as bar:
            for chunk in batches:
                yield worker.process(chunk)
                bar.advance(len(chunk))
