"""``--executor ray``: batches run on Ray actors that load the models once and write into the same run
directory (shared storage) through the same atomic manifest appends as a local run.

Fault tolerance is Ray's: actors restart after a crash (``max_restarts``) and their in-flight call is
retried (``max_task_retries``). A retried batch skips the inputs the killed attempt already recorded, so
nothing is duplicated; the run stays resumable with ``--resume`` like any other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from cfx_cli.errors import UsageError

MAX_RESTARTS = 3
INSTALL_HINT = "pip install 'cfx[ray]'"


def check_ray_available() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None


def _worker_class():
    import ray

    @ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    class RayExplainWorker:
        def __init__(self, req, params: dict, run_path: str) -> None:
            from cfx_cli.pipeline import BatchWorker

            self.worker = BatchWorker.build(req, params, run_path)

        def pid(self) -> int:
            return os.getpid()

        def process(self, chunk) -> list[dict]:
            return self.worker.process(chunk, skip_recorded=True)

    return RayExplainWorker


def run_batches_on_ray(batches, req, params: dict, run_path: str, progress_stream=None) -> Iterator[list[dict]]:
    import ray

    from cfx_cli.progress import Progress

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
        actors = [worker_cls.remote(req, params, run_path) for _ in range(n_workers)]
        queue = list(enumerate(batches))
        in_flight: dict = {}
        with Progress(f"explain ({req.method}, ray × {n_workers})", sum(map(len, batches)),
                      stream=progress_stream) as bar:
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
