"""Building ``report.html``: the gallery data of one run, or of several runs matched input by input,
rendered by :mod:`cfx_cli.report.page` over the pictures of :mod:`cfx_cli.report.pictures`.

The page needs no server and no network: images are relative links to the PNGs in the run directories.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cfx_cli.atomic import atomic_write
from cfx_cli.errors import UsageError
from cfx_cli.evaluate import read_eval, unique_names
from cfx_cli.report.page import finite_number, render_page
from cfx_cli.report.pictures import RunPictures, file_stem, image_size, relative_url
from cfx_cli.runs import RunData

REPORT_NAME = "report.html"


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy of manifest data for the page: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if depth > 8:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    return value


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _cell(pics: RunPictures, rec: dict, warnings: list[str]) -> dict:
    """What the page shows for one record of one run (plain JSON; the JS renders it)."""
    status = rec.get("status") if rec.get("status") in ("flipped", "not_flipped", "skipped", "error") \
        else "error"
    cell: dict[str, Any] = {
        "status": status,
        "error": _text(rec.get("error")),
        "source": _text(rec.get("source")),
        "source_label": _text(rec.get("source_label")),
        "source_prob": finite_number(rec.get("source_prob")),
        "source_prob_after": finite_number(rec.get("source_prob_after")),
        "target_label": _text(rec.get("target_label")),
        "target_prob_before": finite_number(rec.get("target_prob_before")),
        "target_prob_after": finite_number(rec.get("target_prob_after")),
        "cf_label": _text(rec.get("cf_label")),
        "params": _plain(rec["params"]) if isinstance(rec.get("params"), dict) else None,
        "seconds": finite_number(rec.get("seconds")),
        "nfe": finite_number(rec.get("nfe")),
        "seed": finite_number(rec.get("seed")),
        "l1": None, "gain": None, "img": {}, "w": None, "h": None, "overlay": None,
    }
    found = {key: pics.inside(rec.get(key)) for key in ("original", "counterfactual", "mask")}
    for key, path in found.items():
        if rec.get(key) and path is None:
            warnings.append(f"{pics.root}: record {rec.get('id')!r}: {key} {rec.get(key)!r} is missing or "
                            "outside the run directory; not shown")
    orig, cf, mask = found["original"], found["counterfactual"], found["mask"]
    if orig is not None:
        cell["img"]["original"] = pics.url(orig)
    if cf is not None:
        cell["img"]["counterfactual"] = pics.url(cf)
    if orig is not None and cf is not None:
        try:
            d = pics.derive(str(rec.get("id")), orig, cf, mask)
        except (ValueError, OSError) as exc:
            warnings.append(f"{pics.root}: record {rec.get('id')!r}: no difference picture ({exc})")
        else:
            cell["img"]["diff"] = pics.url(pics.diff_dir / f"{file_stem(str(rec.get('id')))}.png")
            cell["img"]["overlay"] = pics.url(pics.overlay_dir / f"{file_stem(str(rec.get('id')))}.png")
            cell.update({k: d[k] for k in ("overlay", "l1", "gain", "w", "h")})
    if orig is not None and cell["w"] is None:
        try:
            cell["w"], cell["h"] = image_size(orig)
        except OSError:
            pass
    return cell


def _run_summary(run, name: str, base: Path) -> dict:
    info = run.info if isinstance(run.info, dict) else {}
    clf = info.get("classifier") if isinstance(info.get("classifier"), dict) else {}
    timings = info.get("timings") if isinstance(info.get("timings"), dict) else {}
    counts = {s: 0 for s in ("flipped", "not_flipped", "skipped", "error")}
    for r in run.records:
        if not isinstance(r, dict):
            continue
        s = r.get("status")
        counts[s if s in counts else "error"] += 1
    return {
        "name": name,
        "path": relative_url(run.path, base) or ".",
        "method": _text(info.get("method")),
        "target": _text(info.get("target")),
        "classifier": _text(clf.get("spec")),
        "model": _text(info.get("model")),
        "parameters": _plain(info["parameters"]) if isinstance(info.get("parameters"), dict) else {},
        "device": _text(info.get("device_name") or info.get("device")),
        "started": _text(info.get("started")),
        "status": _text(info.get("status")),
        "seconds": finite_number(timings.get("total_seconds")),
        "counts": counts,
    }


def build_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the report of one run (default ``RUN_DIR/report.html``) or several runs compared
    input by input (``output`` required). Returns the path written."""
    if not run_dirs:
        raise UsageError("cfx report: give at least one run directory")
    runs = [RunData.load(p) for p in run_dirs]
    if output is None:
        if len(runs) > 1:
            raise UsageError("cfx report: comparing several runs needs --output FILE.html")
        out = runs[0].path / REPORT_NAME
    else:
        out = Path(output)
        if out.is_dir():
            out = out / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent

    warnings: list[str] = []
    names = unique_names([str(r.path) for r in runs])
    order: list[str] = []
    rows: dict[str, list] = {}
    # Derived PNGs are small; the time goes to fsync and PNG coding, which release the GIL.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for k, run in enumerate(runs):
            pics = RunPictures(run.path, base)
            records = [r for r in run.records if isinstance(r, dict) and "id" in r]
            if len(records) != len(run.records):
                warnings.append(f"{run.path}: {len(run.records) - len(records)} manifest lines are not "
                                "records (no id); not shown")
            cells = pool.map(lambda rec, _p=pics: _cell(_p, rec, warnings), records)
            for rec, cell in zip(records, cells, strict=True):
                ident = str(rec.get("id"))
                if ident not in rows:
                    rows[ident] = [None] * len(runs)
                    order.append(ident)
                rows[ident][k] = cell  # a later record of the same id wins
            pics.save_index()
    data = {
        "runs": [_run_summary(r, n, base) for r, n in zip(runs, names, strict=True)],
        "rows": [{"id": i, "cells": rows[i]} for i in order],
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    evals = [read_eval(r.path) for r in runs]
    title = "cfx report: " + " vs ".join(names)
    page = render_page(title, data, evals, names, warnings)
    _write_text_atomic(out, page)
    for w in warnings[:5]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > 5:
        print(f"warning: … and {len(warnings) - 5} more (listed at the top of the report)", file=sys.stderr)
    return out


def write_run_report(run_dir: str | Path, debug: bool = False) -> None:
    """``RUN_DIR/report.html`` at the end of ``cfx explain``/``cfx merge``: a failure is a one-line
    warning, never a failed run (its outputs are already written); ``debug`` re-raises."""
    try:
        build_report([run_dir])
    except Exception as exc:
        if debug:
            raise
        print(f"warning: {run_dir}/report.html not written: {type(exc).__name__}: {exc} "
              f"(retry with `cfx report {run_dir}`)", file=sys.stderr)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", perms=None) as f:  # a report is meant to be shared: the umask's
        f.write(text)
