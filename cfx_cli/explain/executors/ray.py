"""``--executor ray``: batches run on Ray actors that load the models once and write into the same run
directory (shared storage) through the same atomic manifest appends as a local run.

Fault tolerance is Ray's: actors restart after a crash (``max_restarts``) and their in-flight call is
retried (``max_task_retries``). A retried batch skips the inputs the killed attempt already recorded, so
nothing is duplicated; the run stays resumable with ``--resume`` like any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from cfx_cli.errors import UsageError
from cfx_cli.explain.batch import build_worker
from cfx_cli.progress import Progress

if TYPE_CHECKING:
    from cfx_cli.explain.batch import BatchWorker
    from cfx_cli.explain.request import ExplainPlan, ExplainRequest
    from cfx_cli.images import InputImage
    from cfx_cli.runs import Record

MAX_RESTARTS = 3
INSTALL_HINT = "pip install 'cfx[ray]'"


def _worker_class():
    import ray

    @ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    class RayExplainWorker:
        def __init__(self, plan: ExplainPlan) -> None:
            self.worker = build_worker(plan)

        def pid(self) -> int:
            return os.getpid()

        def process(self, chunk) -> list[Record]:
            return self.worker.process(chunk, skip_recorded=True)

    return RayExplainWorker


class RayExecutor:
    name = "ray"

    def check(self, req: ExplainRequest) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
        if req.workers < 1:
            raise UsageError(f"--workers {req.workers}: must be at least 1")

    def run(self, batches: list[list[InputImage]], worker: BatchWorker, plan: ExplainPlan,
            progress_stream: TextIO | None = None, initial: int = 0) -> Iterator[list[Record]]:
        import ray

        req = plan.req
        worker.close()  # the actors load their own copies
        started_here = False
        if not ray.is_initialized():
            # without an address: a private local instance bound to loopback
            kwargs = {"address": req.ray_address} if req.ray_address else {"_node_ip_address": "127.0.0.1"}
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING", **kwargs)
            started_here = True
        try:
            options = {"num_gpus": req.gpus_per_worker} if req.gpus_per_worker else {}
            worker_cls = _worker_class().options(num_cpus=1, **options)
            n_workers = max(1, min(req.workers, len(batches)))
            actors = [worker_cls.remote(plan) for _ in range(n_workers)]
            queue = list(enumerate(batches))
            in_flight: dict = {}
            with Progress(f"explain ({req.method}, ray × {n_workers})", initial + sum(map(len, batches)),
                          stream=progress_stream, initial=initial) as bar:
                idle = list(actors)
                while queue or in_flight:
                    while queue and idle:
                        actor = idle.pop()
                        index, chunk = queue.pop(0)
                        in_flight[actor.process.remote(chunk)] = (actor, index, chunk)
                    ready, _ = ray.wait(list(in_flight), num_returns=1)
                    ref = ready[0]
                    actor, index, chunk = in_flight.pop(ref)
                    try:
                        records = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        # the actor is gone for good (restarts exhausted): give the batch to another one
                        if len(actors) > 1:
                            actors.remove(actor)
                        else:
                            raise UsageError(f"all Ray workers failed; last error: {exc}") from None
                        queue.insert(0, (index, chunk))
                        continue
                    idle.append(actor)
                    bar.advance(len(chunk))
                    yield records
        finally:
            if started_here:
                ray.shutdown()
