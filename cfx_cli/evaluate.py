"""``cfx eval``: compute metrics over one or more run directories."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cfx_cli.errors import CfxError, MetricUnavailable, UsageError
from cfx_cli.runs import state_line


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
    from cfx_cli.plugins import get_registry

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
    from cfx_cli.runs import RunData

    if layout == "cfx":
        return [RunData.load(p) for p in run_dirs]
    if layout == "ace":
        from cfx_cli.export import load_ace

        return [run for p in run_dirs for run in load_ace(p)]
    raise UsageError(f"--layout {layout!r}: expected cfx or ace")


def evaluate(run_dirs: list[str], metric_names: str | None, device: str = "cpu",
             options: dict | None = None, layout: str = "cfx") -> EvalResult:
    from cfx_cli.metrics import MetricContext

    chosen = select_metrics(metric_names)
    runs = load_runs(run_dirs, layout)
    names = _unique_names([str(r.path / getattr(r, "display_name", "")) for r in runs])
    columns: list[str] = ["n", "flipped"]
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, str]] = {}
    unfinished: dict[str, str] = {}
    directions: dict[str, bool | None] = {}
    for run, name in zip(runs, names, strict=True):
        row: dict[str, Any] = {"n": len(run.records), "flipped": sum(r["status"] == "flipped" for r in run.records)}
        cache: dict[str, Any] = {}

        def load_classifier(_run=run, _cache=cache):
            if "classifier" not in _cache:
                from cfx_cli.classifiers import ClassifierOptions, load_classifier

                # --set classifier=SPEC overrides the run's own (e.g. for folders in the ACE layout)
                spec = (options or {}).get("classifier") or (_run.info.get("classifier") or {}).get("spec")
                if not spec:
                    raise MetricUnavailable("run.json does not name the classifier")
                try:
                    _cache["classifier"] = load_classifier(spec, ClassifierOptions(device=device))
                except CfxError as exc:
                    raise MetricUnavailable(f"cannot load classifier {spec}: {exc}") from None
            return _cache["classifier"]

        ctx = MetricContext(device=device, options=dict(options or {}), _classifier_loader=load_classifier)
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
                directions[col] = cls.lower_is_better
        if "classifier" in cache:
            cache["classifier"].close()
        rows[name] = row
        line = state_line(run.path, run.info, len(run.records))
        if line:
            unfinished[name] = line
    # folders in the ACE layout are not run directories: no RUN_DIR/eval.json for them
    return EvalResult(names, columns, rows, skipped, directions,
                      {n: str(r.path) for n, r in zip(names, runs, strict=True) if layout == "cfx"}, unfinished)


def save_eval_json(result: EvalResult, metric_names: str | None) -> list[str]:
    """Write each run's row to ``RUN_DIR/eval.json`` (read by ``cfx report``); returns warnings
    for runs whose directory cannot be written (the metrics are still printed)."""
    from pathlib import Path

    from cfx_cli.report import write_eval_json

    problems = []
    for name in result.runs:
        if name not in result.paths:
            continue
        path = Path(result.paths[name])
        try:
            write_eval_json(path, result.rows[name], result.skipped.get(name, {}), result.lower_is_better,
                            metric_names)
        except OSError as exc:
            problems.append(f"{path}/eval.json not written: {exc.strerror or exc}")
    return problems


def _unique_names(paths: list[str]) -> list[str]:
    from pathlib import Path

    names = [Path(p).name for p in paths]  # e.g. "ace-out/pgd" → "pgd"
    if len(set(names)) == len(names):
        return names
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
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
        import csv
        import io

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
            table.add_row(c, *(_fmt(result.rows[r].get(c)) for r in result.runs))
        console = Console(width=max(80, 24 + 18 * len(result.runs)), record=True, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
        return cap.get()
    raise UsageError(f"--format {fmt!r}: expected table, json or csv")
