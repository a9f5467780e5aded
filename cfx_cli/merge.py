"""``cfx merge``: combine run directories (shards of one job) into one run that ``cfx eval`` reads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cfx_cli.errors import UsageError
from cfx_cli.runs import IMAGE_DIRS, RUN_JSON, SEEDS_DIR, RunData, RunDir, seed_run_dirs, write_json_atomic

PATH_FIELDS = ("original", "counterfactual", "mask")


def _signature(info: dict) -> tuple:
    return (info.get("method"), json.dumps(info.get("parameters"), sort_keys=True),
            (info.get("classifier") or {}).get("spec"), info.get("target"), info.get("seed"))


def _check(sources: list[str | Path], where: str = "") -> list[RunData]:
    """Load and validate the runs and, level by level, their ``seeds/K`` sub-runs, before anything is written."""
    runs = [RunData.load(s) for s in sources]
    if len({_signature(r.info) for r in runs}) > 1:
        raise UsageError(f"cannot merge runs{where} made with different method, parameters, classifier, target "
                         "or seed")
    seed_sets = {r.path: tuple(p.name for p in seed_run_dirs(r.path)) for r in runs}
    if len(set(seed_sets.values())) > 1:  # shards of one --seeds N job all have seeds/1 … seeds/N−1
        shown = "; ".join(f"{p}: {', '.join(k) or 'none'}" for p, k in seed_sets.items())
        raise UsageError(f"cannot merge runs{where} with different {SEEDS_DIR}/ sub-runs ({shown})")
    for k in next(iter(seed_sets.values()), ()):
        _check([r.path / SEEDS_DIR / k for r in runs], f" {SEEDS_DIR}/{k}")
    return runs


def merge_runs(sources: list[str], out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Merge shard runs into ``out``. Shards must share method, parameters, classifier, target and seed, and
    the same ``seeds/K`` sub-runs (``--seeds N``), which are merged into ``out/seeds/K`` the same way.

    An input present in several shards keeps its first non-error record, so merging the shards of an
    interrupted-and-resumed job still yields one record per input.
    """
    runs = _check(sources)
    return _merge(runs, Path(out), overwrite)


def _merge(runs: list[RunData], out: Path, overwrite: bool) -> dict[str, int]:
    dest = RunDir(out)
    dest.prepare(resume=False, overwrite=overwrite)
    chosen: dict[str, tuple[dict, RunData]] = {}
    for run in runs:
        for rec in run.records:
            prev = chosen.get(rec["id"])
            if prev is None or (prev[0]["status"] == "error" and rec["status"] != "error"):
                chosen[rec["id"]] = (rec, run)
    counts: dict[str, int] = {}
    for ident in sorted(chosen):
        rec, run = chosen[ident]
        for field in PATH_FIELDS:
            rel = rec.get(field)
            if rel:
                src = run.path / rel
                target = dest.path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".tmp-{target.name}")
                shutil.copyfile(src, tmp)
                os.replace(tmp, target)
        for folder in (p for p in run.path.iterdir() if p.is_dir()):  # extras such as pre_explanations/
            extra = folder / f"{ident}.png"
            if folder.name not in IMAGE_DIRS and extra.exists():
                (dest.path / folder.name).mkdir(exist_ok=True)
                shutil.copyfile(extra, dest.path / folder.name / extra.name)
        dest.append(rec)
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    info = dict(runs[0].info)
    info["merged_from"] = [str(r.path) for r in runs]
    info["shard"] = None
    info["counts"] = counts
    info["timings"] = {
        "total_seconds": round(sum((r.info.get("timings") or {}).get("total_seconds", 0) for r in runs), 3),
        "explain_seconds": round(sum((r.info.get("timings") or {}).get("explain_seconds", 0) for r in runs), 3),
    }
    write_json_atomic(dest.path / RUN_JSON, info)
    for sub in seed_run_dirs(runs[0].path):  # validated by _check: every run has the same seeds/K
        _merge([RunData.load(r.path / SEEDS_DIR / sub.name) for r in runs], dest.path / SEEDS_DIR / sub.name,
               overwrite=False)
    return counts
