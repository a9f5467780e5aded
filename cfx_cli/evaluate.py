"""``cfx eval``: compute metrics over one or more run directories, and keep each run's result in
``RUN_DIR/eval.json`` (what ``cfx report`` shows)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.errors import CfxError, MetricUnavailable, UsageError
from cfx_cli.export import load_ace
from cfx_cli.metrics import MetricContext
from cfx_cli.plugins import get_registry
from cfx_cli.runs import MANIFEST, RunData, state_line, write_json_atomic

EVAL_JSON = "eval.json"


@dataclass
class EvalResult:
    runs: list[str]
    columns: list[str]
    rows: dict[str, dict[str, Any]]  # run name → column → value
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # run → metric → reason
    lower_is_better: dict[str, bool | None] = field(default_factory=dict)  # column → the metric's direction
    paths: dict[str, str] = field(default_factory=dict)  # run name → run directory
    unfinished: dict[str, str] = field(default_factory=dict)  # run name → why it is partial (interrupted, running)


def select_metrics(names: str | None) -> list[tuple[str, type]]:
    metrics = get_registry().metrics
    if not names:
        return [(n, cls) for n, (cls, _) in metrics.items() if cls.default]
    if names.strip() == "all":  # every installed metric; those that cannot run are skipped with a reason
        return [(n, cls) for n, (cls, _) in sorted(metrics.items())]
    chosen = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in metrics:
            raise UsageError(f"unknown metric {name!r} (installed: {', '.join(sorted(metrics))})")
        chosen.append((name, metrics[name][0]))
    return chosen


def load_runs(run_dirs: list[str], layout: str = "cfx") -> list:
    """Run directories (``cfx``) or ACE-layout folders (``ace``: one run per Results/EXP)."""
    if layout == "cfx":
        return [RunData.load(p) for p in run_dirs]
    if layout == "ace":
        return [run for p in run_dirs for run in load_ace(p)]
    raise UsageError(f"--layout {layout!r}: expected cfx or ace")


def evaluate(run_dirs: list[str], metric_names: str | None, device: str = "cpu",
             options: dict | None = None, layout: str = "cfx") -> EvalResult:
    chosen = select_metrics(metric_names)
    runs = load_runs(run_dirs, layout)
    names = unique_names([str(r.path / getattr(r, "display_name", "")) for r in runs])
    columns: list[str] = ["n", "flipped"]
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, str]] = {}
    unfinished: dict[str, str] = {}
    directions: dict[str, bool | None] = {}
    for run, name in zip(runs, names, strict=True):
        row: dict[str, Any] = {"n": len(run.records), "flipped": sum(r["status"] == "flipped" for r in run.records)}
        cache: dict[str, Any] = {}

        def classifier_loader(_run=run, _cache=cache):
            if "classifier" not in _cache:
                # --set classifier=SPEC overrides the run's own (e.g. for folders in the ACE layout)
                recorded = _run.info.get("classifier") or {}
                spec = (options or {}).get("classifier") or recorded.get("spec")
                if not spec:
                    raise MetricUnavailable("run.json does not name the classifier")
                # #attribute=NAME resolved against --labels at explain time: the same output names again
                names = (recorded.get("output") or {}).get("names") if spec == recorded.get("spec") else None
                try:
                    _cache["classifier"] = load_classifier(spec, ClassifierOptions(device=device, labels=names))
                except CfxError as exc:
                    raise MetricUnavailable(f"cannot load classifier {spec}: {exc}") from None
            return _cache["classifier"]

        ctx = MetricContext(device=device, options=dict(options or {}), _classifier_loader=classifier_loader)
        for metric_name, cls in chosen:
            try:
                values = cls().compute(run, ctx)
            except MetricUnavailable as exc:
                skipped.setdefault(name, {})[metric_name] = str(exc)
                continue
            for col, value in values.items():
                if col not in columns:
                    columns.append(col)
                row[col] = value
                directions[col] = None if col in cls.unranked else cls.lower_is_better
        if "classifier" in cache:
            cache["classifier"].close()
        rows[name] = row
        line = state_line(run.path, run.info, len(run.records))
        if line:
            unfinished[name] = line
    # folders in the ACE layout are not run directories: no RUN_DIR/eval.json for them
    return EvalResult(names, columns, rows, skipped, directions,
                      {n: str(r.path) for n, r in zip(names, runs, strict=True) if layout == "cfx"}, unfinished)


def manifest_digest(run_path: Path) -> str | None:
    """SHA-256 of the run's manifest: an eval.json computed on another manifest is stale."""
    try:
        return hashlib.sha256((run_path / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def read_eval(run_path: Path) -> dict | None:
    """``RUN_DIR/eval.json`` as written by ``cfx eval``, with ``stale`` set when the manifest changed."""
    p = run_path / EVAL_JSON
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"warning: {p}: unreadable ({exc}); no metrics shown for this run", file=sys.stderr)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
        print(f"warning: {p}: not a cfx eval.json; no metrics shown for this run", file=sys.stderr)
        return None
    recorded = data.get("manifest_sha256")
    data["stale"] = bool(recorded) and recorded != manifest_digest(run_path)
    return data


def write_eval_json(run_path: Path, row: dict, skipped: dict, directions: dict, metrics: str | None) -> Path:
    """Save one run's ``cfx eval`` result beside its manifest. Columns computed earlier on the same
    manifest (e.g. by another ``--metrics`` selection) are kept; a changed manifest starts afresh."""
    digest = manifest_digest(run_path)
    old = read_eval(run_path)
    values: dict = {}
    old_skipped: dict = {}
    old_dirs: dict = {}
    if old is not None and not old.get("stale") and old.get("manifest_sha256") == digest:
        values = dict(old.get("values") or {})
        old_skipped = dict(old.get("skipped") or {})
        old_dirs = dict(old.get("lower_is_better") or {})
    values.update(row)
    for name in list(old_skipped):
        if any(col.startswith(name) for col in row):
            old_skipped.pop(name)
    data = {
        "cfx_eval_version": 1,
        "computed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics or "default",
        "manifest_sha256": digest,
        "values": values,
        "lower_is_better": old_dirs | {k: v for k, v in directions.items() if k in row},
        "skipped": old_skipped | dict(skipped),
    }
    path = run_path / EVAL_JSON
    write_json_atomic(path, data)
    return path


def save_eval_json(result: EvalResult, metric_names: str | None) -> tuple[list[Path], list[str]]:
    """Write each run's row to ``RUN_DIR/eval.json`` (read by ``cfx report``); returns the run
    directories written and warnings for those that cannot be written (the metrics are still printed)."""
    saved: list[Path] = []
    problems = []
    for name in result.runs:
        if name not in result.paths:
            continue
        path = Path(result.paths[name])
        try:
            write_eval_json(path, result.rows[name], result.skipped.get(name, {}), result.lower_is_better,
                            metric_names)
        except OSError as exc:
            problems.append(f"{path}/{EVAL_JSON} not written: {exc.strerror or exc}")
        else:
            saved.append(path)
    return saved, problems


def unique_names(paths: list[str]) -> list[str]:
    """Short names for runs: the folder names (e.g. "ace-out/pgd" → "pgd"), or the paths when those clash."""
    names = [Path(p).name or p for p in paths]
    if len(set(names)) == len(names):
        return names
    return paths


def format_value(value: Any) -> str:
    """A metric value as the eval table and the report print it."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def render(result: EvalResult, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(
            {"runs": [{"run": r, **result.rows[r], "skipped": result.skipped.get(r, {})} for r in result.runs]},
            indent=2,
        )
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", *result.columns])
        for r in result.runs:
            writer.writerow([r, *("" if result.rows[r].get(c) is None else result.rows[r].get(c)
                                  for c in result.columns)])
        return buf.getvalue()
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table(title="cfx eval")
        table.add_column("metric")
        for r in result.runs:
            table.add_column(r, justify="right")
        for c in result.columns:
            table.add_row(c, *(format_value(result.rows[r].get(c)) for r in result.runs))
        console = Console(width=max(80, 24 + 18 * len(result.runs)), record=True, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
        return cap.get()
    raise UsageError(f"--format {fmt!r}: expected table, json or csv")
