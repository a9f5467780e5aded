"""``cfx explain`` end to end: resolve the request → build the worker → prepare the run directory and run.json →
explain the batches on the executor → finish run.json and the report.

The CLI only parses options into an :class:`~cfx_cli.explain.request.ExplainRequest`; everything else happens
here so that other front ends (Ray workers, notebooks) run exactly the same code.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from cfx_cli.devices import describe_device
from cfx_cli.errors import UsageError
from cfx_cli.explain.batch import BatchWorker, build_worker
from cfx_cli.explain.request import ExplainPlan, ExplainRequest, resolve
from cfx_cli.images import InputImage, image_size, resize_problem
from cfx_cli.report import write_run_report
from cfx_cli.runs import RUN_JSON, SEEDS_DIR, STATUSES, RunDir, process_info, read_run_json, resume_line

#: the distributions whose versions run.json records
VERSIONED = ("cfx", "torch", "numpy", "pillow", "diffusers", "onnxruntime")
#: warn about at most this many resized inputs one by one; the rest are counted
RESIZE_WARNINGS = 10


@dataclass
class ExplainSummary:
    run_dir: Path
    counts: dict[str, int]
    errors: list[str]
    seconds: float
    resized: int = 0  # inputs resized by more than 4× or with their aspect ratio changed by more than 10 %

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("error") else 0


def run_explain(req: ExplainRequest, progress_stream: TextIO | None = None) -> ExplainSummary:
    """Run an explanation job; raises :class:`UsageError` before any work for bad requests."""
    t_start = time.monotonic()
    plan = resolve(req)
    run = RunDir(plan.out)
    old_info: dict[str, Any] = {}

    def check_run_dir(classifier) -> None:
        run.check(resume=req.resume, overwrite=req.overwrite)
        old_info.update(read_run_json(plan.out))  # before this run rewrites it: what --resume continues
        if req.resume:
            _check_resume_matches(plan, classifier.spec)

    # build the explainer (loads its models) before touching the run directory: a method that
    # cannot start leaves nothing behind
    worker = build_worker(plan, before_explainer=check_run_dir)
    try:
        done = run.prepare(resume=req.resume, overwrite=req.overwrite)
        for note in plan.notes:  # only once the request is known to be valid
            print(note, file=sys.stderr)
        items = plan.items
        pending = [it for it in items if it.id not in done]
        if req.resume:
            print(resume_line(old_info, len(items) - len(pending), len(items)), file=sys.stderr)
        resized = _warn_resized(items, {it.id for it in pending}, worker.size, f"{req.method}'s working size")
        info = _run_info(plan, worker, resized)
        run.write_run_json(info)

        counts = {s: 0 for s in STATUSES}
        for rec in done.values():
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        errors: list[str] = []
        t_work = time.monotonic()
        batches = [pending[i : i + req.batch_size] for i in range(0, len(pending), req.batch_size)]
        for records in plan.executor.run(batches, worker, plan, progress_stream, initial=len(items) - len(pending)):
            for rec in records:
                counts[rec.status] += 1
                if rec.status == "error":
                    errors.append(rec.error)
        info.update({
            "status": "finished",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timings": {
                "total_seconds": round(time.monotonic() - t_start, 3),
                "explain_seconds": round(time.monotonic() - t_work, 3),
                "setup_seconds": round(t_work - t_start, 3),
                "inputs_processed": len(pending),
            },
            "counts": counts,
        })
        run.write_run_json(info)
    finally:
        worker.close()
    write_run_report(plan.out, debug=req.options.debug)
    return ExplainSummary(plan.out, counts, errors, time.monotonic() - t_start, resized)


def _warn_resized(items: list[InputImage], pending: set[str], size: tuple[int, int] | None, who: str) -> int:
    """One warning line per input (of those about to be explained) that bringing to the explainer's working size
    (short-side resize + centre crop) scales by more than 4× or crops to an aspect ratio more than 10 % off;
    returns how many of the job's inputs are so. The classifier's own resize of the images it is given is its
    preprocessing, not warned about."""
    if size is None:
        return 0
    count, shown = 0, 0
    for item in items:
        problem = resize_problem(image_size(item.path), size, who)
        if problem is None:
            continue
        count += 1
        if item.id in pending:
            shown += 1
            if shown <= RESIZE_WARNINGS:
                print(f"warning: {item.path}: {problem}", file=sys.stderr)
    if shown > RESIZE_WARNINGS:
        print(f"warning: {shown - RESIZE_WARNINGS} more inputs are resized like that", file=sys.stderr)
    return count


def _run_info(plan: ExplainPlan, worker: BatchWorker, resized: int) -> dict[str, Any]:
    """run.json as it is written when the work starts (``status: running``)."""
    req, region = plan.req, plan.region
    device = worker.explainer.context.device
    return {
        "cfx_run_version": 1,
        "method": req.method,
        "parameters": plan.params,
        "target": req.target,
        "classifier": worker.classifier.describe(),
        "model": req.model,
        "seed": req.seed,
        "seeds": req.seeds,
        "batch_size": req.batch_size,
        "device": device,
        "device_name": describe_device(device),
        # what was asked for; each record's params say what each method's forward calls actually ran on
        "backend": req.options.backend_summary(),
        "versions": _versions(),
        "inputs": list(req.inputs),
        "mask": region.spec if region is not None else None,
        # the options a source reads, as it resolved them (cam: the layer, after its check)
        "region_options": (region.options or None) if region is not None and region.option_defaults else None,
        "shard": req.shard,
        "command": _redacted_argv(),
        "method_info": worker.explainer.run_info() or None,  # e.g. TIME's token files and their SHA-256
        "inputs_total": len(plan.items),
        # [H, W] every input was brought to (the generator's resolution); None = each input at its native size
        "working_size": list(worker.size) if worker.size else None,
        "resized_inputs": resized,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "process": process_info(),  # with status running: --resume and cfx eval tell a killed run from a live one
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _redacted_argv() -> list[str]:
    # Tokens come from the environment, never argv; still drop anything that looks like a credential.
    return [("<redacted>" if any(k in a.lower() for k in ("token=", "bearer ", "password=")) else a)
            for a in sys.argv]


def _check_resume_matches(plan: ExplainPlan, spec: str) -> None:
    """Resuming with other settings would mix two experiments in one manifest: refuse."""
    out = plan.out
    try:
        old = json.loads((out / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # nothing (readable) to compare with
    before = (old.get("method"), old.get("parameters"), (old.get("classifier") or {}).get("spec"))
    now = (plan.method, json.loads(json.dumps(plan.params)), spec)
    if before != now:
        what = [name for name, a, b in zip(("method", "parameters", "classifier"), before, now, strict=True)
                if a != b]
        raise UsageError(
            f"--resume: {out} was made with a different {' and '.join(what)}; resume with the same options, "
            "or use --overwrite or another --out"
        )


def run_explain_seeds(req: ExplainRequest, progress_stream: TextIO | None = None) -> list[ExplainSummary]:
    """``--seeds N``: the run with ``req.seed`` in RUN_DIR as usual, then one complete run per extra seed in
    ``RUN_DIR/seeds/K`` (K = 1 … N−1, run seed ``req.seed + K``), each a run directory of its own with the
    same ids, so diversity metrics pair counterfactuals by id."""
    if req.seeds < 1:
        raise UsageError(f"--seeds {req.seeds}: must be at least 1")
    first = run_explain(req, progress_stream)
    summaries = [first]
    for k in range(1, req.seeds):
        sub = replace(req, out=str(Path(first.run_dir) / SEEDS_DIR / str(k)), seed=req.seed + k, seeds=1)
        summaries.append(run_explain(sub, progress_stream))
    return summaries
