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
            progress_stream: TextIO | None = None) -> Iterator[list[Record]]:
        with Progress(f"explain ({plan.method})", sum(map(len, batches)), stream=progress_stream) as bar:
            for chunk in batches:
                yield worker.process(chunk)
                bar.advance(len(chunk))
