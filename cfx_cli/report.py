"""``report.html``: a static, self-contained gallery of one run or of several runs side by side.

The page needs no server and no network: CSS and JS are inline, images are relative links to the
PNGs in the run directories. Derived pictures (amplified difference heatmap, mask overlay) are
written once into ``RUN_DIR/report/{diff,overlay}/`` and reused while they are newer than their
sources. Every string that comes from a manifest or run.json reaches the page either through
:func:`html.escape` (server-rendered header and eval table) or as JSON inside a
``<script type="application/json">`` block read by JS that only ever sets ``textContent``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import sys
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from cfx_cli.errors import UsageError

REPORT_NAME = "report.html"
EVAL_JSON = "eval.json"
DERIVED_DIR = "report"
_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
#: RdBu-like diverging colour map: darker in the counterfactual → blue, brighter → red
_CMAP_X = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_CMAP_RGB = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                     dtype=np.float32) / 255.0
_MASK_TINT = np.array([1.0, 0.62, 0.0], dtype=np.float32)  # amber
_CHANGE_TINT = np.array([0.85, 0.1, 0.1], dtype=np.float32)


def file_stem(ident: str) -> str:
    """A file name for a record id: the id itself when it is a plain slug (what ``cfx explain``
    writes), else a hash, so hostile ids from a hand-edited manifest never shape a path."""
    if _SAFE_STEM.fullmatch(ident) and ".." not in ident:
        return ident
    return "id-" + hashlib.sha256(ident.encode("utf-8")).hexdigest()[:20]


def _luminance(img: np.ndarray) -> np.ndarray:
    return img.mean(axis=2) if img.shape[2] != 1 else img[..., 0]


def diff_heatmap(original: np.ndarray, counterfactual: np.ndarray) -> tuple[np.ndarray, float]:
    """Signed luminance change as an RdBu picture, amplified so that the 99th percentile of |Δ|
    saturates (at most ×255: a change below one grey level is never blown up to full colour)."""
    delta = _luminance(counterfactual) - _luminance(original)
    scale = max(float(np.percentile(np.abs(delta), 99)), 1.0 / 255.0)
    t = np.clip(delta / scale, -1.0, 1.0)
    rgb = np.stack([np.interp(t, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], axis=2)
    return rgb.astype(np.float32), 1.0 / scale


def mask_overlay(original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The region allowed to change in colour with an amber tint; the rest greyed and dimmed."""
    m = (mask[..., 0] if mask.ndim == 3 else mask) >= 0.5
    gray = np.repeat(_luminance(original)[..., None], 3, axis=2)
    out = 0.25 + 0.45 * gray
    tinted = 0.6 * original + 0.4 * _MASK_TINT
    out[m] = tinted[m]
    return out.astype(np.float32)


def change_overlay(original: np.ndarray, counterfactual: np.ndarray, gain: float) -> np.ndarray:
    """No mask: the size of the change painted in red over the greyed original."""
    mag = np.clip(np.abs(_luminance(counterfactual) - _luminance(original)) * gain, 0.0, 1.0)
    gray = np.repeat(_luminance(original)[..., None], 3, axis=2)
    base = 0.2 + 0.55 * gray
    alpha = (0.75 * mag)[..., None]
    return (base * (1 - alpha) + _CHANGE_TINT * alpha).astype(np.float32)


class _RunPictures:
    """Derived pictures of one run: ``report/{diff,overlay}/STEM.png`` plus ``report/index.json``,
    which remembers ℓ1, gain and size per record with the sources' (mtime, size), so that a report
    rewritten over an unchanged run decodes no image at all."""

    INDEX = "index.json"

    def __init__(self, run_path: Path, base: Path) -> None:
        from cfx_cli.images import safe_child

        self.root = run_path.resolve()
        self.base = str(base.resolve())
        # resolved and checked once; the stems joined below are slugs or hashes (no separators)
        self.diff_dir = safe_child(self.root, DERIVED_DIR, "diff")
        self.overlay_dir = safe_child(self.root, DERIVED_DIR, "overlay")
        self.index_path = safe_child(self.root, DERIVED_DIR, self.INDEX)
        self.old: dict = {}
        try:
            loaded = json.loads(self.index_path.read_text(encoding="utf-8"))
            entries = loaded.get("entries") if isinstance(loaded, dict) else None
            if isinstance(entries, dict) and loaded.get("version") == 1:
                self.old = entries
        except (OSError, ValueError):
            pass
        self.new: dict = {}

    def url(self, path: Path) -> str:
        """Relative, percent-encoded link from the report's folder to an already resolved ``path``."""
        return quote(Path(os.path.relpath(path, self.base)).as_posix(), safe="/")

    def inside(self, rel: Any) -> Path | None:
        """``RUN_DIR/rel`` if it names an existing file inside the run directory; None otherwise."""
        from cfx_cli.images import safe_child

        if not rel or not isinstance(rel, str):
            return None
        try:
            path = safe_child(self.root, rel)
        except ValueError:
            return None
        return path if path.is_file() else None

    def derive(self, ident: str, orig: Path, cf: Path, mask: Path | None) -> dict:
        """Write (or reuse) the difference heatmap and overlay of one record."""
        from cfx_cli.images import load_png, save_png

        stem = file_stem(ident)
        diff_path, overlay_path = self.diff_dir / f"{stem}.png", self.overlay_dir / f"{stem}.png"
        sources = [orig, cf] + ([mask] if mask else [])
        stats = [p.stat() for p in sources]
        sig = [[st.st_mtime_ns, st.st_size] for st in stats]
        newest = max(st.st_mtime_ns for st in stats)
        entry = self.old.get(stem)
        if (entry and entry.get("sig") == sig and entry.get("overlay") == ("mask" if mask else "change")
                and _newer(diff_path, newest) and _newer(overlay_path, newest)):
            self.new[stem] = entry
            return entry
        a, b = load_png(orig), load_png(cf)
        if a.shape != b.shape:
            raise ValueError(f"original {a.shape[1]}×{a.shape[0]} and counterfactual "
                             f"{b.shape[1]}×{b.shape[0]} differ in size")
        heat, gain = diff_heatmap(a, b)
        if mask is not None:
            m = load_png(mask)
            if m.shape[:2] != a.shape[:2]:
                raise ValueError(f"mask {m.shape[1]}×{m.shape[0]} does not match the image size")
            overlay = mask_overlay(a, m)
        else:
            overlay = change_overlay(a, b, gain)
        save_png(heat, diff_path)
        save_png(overlay, overlay_path)
        entry = {
            "sig": sig, "overlay": "mask" if mask else "change",
            "l1": round(float(np.abs(b - a).mean()), 6),  # the same per-pixel ℓ1 as the `distance` metric
            "gain": round(gain, 2), "w": int(a.shape[1]), "h": int(a.shape[0]),
        }
        self.new[stem] = entry
        return entry

    def save_index(self) -> None:
        from cfx_cli.runs import write_json_atomic

        if self.new != self.old:
            write_json_atomic(self.index_path, {"version": 1, "entries": self.new})


def _newer(path: Path, than_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= than_ns
    except OSError:
        return False


def _url(path: Path, base: Path) -> str:
    """Relative, percent-encoded link from the folder ``base`` to ``path``."""
    return quote(Path(os.path.relpath(path.resolve(), base.resolve())).as_posix(), safe="/")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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


def _cell(pics: _RunPictures, rec: dict, warnings: list[str]) -> dict:
    """What the page shows for one record of one run (plain JSON; the JS renders it)."""
    status = rec.get("status") if rec.get("status") in ("flipped", "not_flipped", "skipped", "error") \
        else "error"
    cell: dict[str, Any] = {
        "status": status,
        "error": _text(rec.get("error")),
        "source": _text(rec.get("source")),
        "source_label": _text(rec.get("source_label")),
        "source_prob": _num(rec.get("source_prob")),
        "source_prob_after": _num(rec.get("source_prob_after")),
        "target_label": _text(rec.get("target_label")),
        "target_prob_before": _num(rec.get("target_prob_before")),
        "target_prob_after": _num(rec.get("target_prob_after")),
        "cf_label": _text(rec.get("cf_label")),
        "params": _plain(rec["params"]) if isinstance(rec.get("params"), dict) else None,
        "seconds": _num(rec.get("seconds")),
        "nfe": _num(rec.get("nfe")),
        "seed": _num(rec.get("seed")),
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
            cell["w"], cell["h"] = _image_size(orig)
        except OSError:
            pass
    return cell


def manifest_digest(run_path: Path) -> str | None:
    from cfx_cli.runs import MANIFEST

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
    from cfx_cli.runs import write_json_atomic

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
        "path": _url(run.path, base) or ".",
        "method": _text(info.get("method")),
        "target": _text(info.get("target")),
        "classifier": _text(clf.get("spec")),
        "model": _text(info.get("model")),
        "parameters": _plain(info["parameters"]) if isinstance(info.get("parameters"), dict) else {},
        "device": _text(info.get("device_name") or info.get("device")),
        "started": _text(info.get("started")),
        "status": _text(info.get("status")),
        "seconds": _num(timings.get("total_seconds")),
        "counts": counts,
    }


def _unique_names(runs) -> list[str]:
    names = [r.path.name or str(r.path) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]


def build_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the report of one run (default ``RUN_DIR/report.html``) or several runs compared
    input by input (``output`` required). Returns the path written."""
    from cfx_cli.runs import RunData

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
    names = _unique_names(runs)
    order: list[str] = []
    rows: dict[str, list] = {}
    # Derived PNGs are small; the time goes to fsync and PNG coding, which release the GIL.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for k, run in enumerate(runs):
            pics = _RunPictures(run.path, base)
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
    from cfx_cli.atomic import atomic_write

    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


# --- the page ---------------------------------------------------------------------------------

def _json_for_script(data: Any) -> str:
    """JSON that cannot close its <script> element or open a comment, whatever the strings hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _eval_table(evals: list[dict | None], names: list[str]) -> str:
    e = html.escape
    if not any(evals):
        dirs = " ".join(e(n) for n in names)
        return (f'<p class="muted">No metrics yet. <code>cfx eval {dirs}</code> saves them to '
                f"<code>RUN_DIR/{EVAL_JSON}</code>; run <code>cfx report</code> again to show them here.</p>")
    columns: list[str] = []
    directions: dict[str, Any] = {}
    for ev in evals:
        if ev:
            for c in ev["values"]:
                if c not in columns:
                    columns.append(c)
            directions.update({k: v for k, v in (ev.get("lower_is_better") or {}).items() if v is not None})
    head = "".join(f"<th>{e(n)}</th>" for n in names)
    body = []
    for c in columns:
        # a direction (arrow, best value when comparing runs) for metrics that have one, but not for
        # *_before columns: they describe the inputs, not how well a method did
        ranked = c in directions and not c.endswith("_before")
        arrow = (" ↓" if directions[c] else " ↑") if ranked else ""
        vals = [ev["values"].get(c) if ev else None for ev in evals]
        nums = [v for v in vals if _num(v) is not None]
        best = (min if directions[c] else max)(nums) if len(nums) > 1 and ranked else None
        cells = "".join(
            f'<td class="{"best" if best is not None and v == best else ""}">{e(_fmt(v))}</td>' for v in vals
        )
        body.append(f'<tr><th scope="row">{e(c)}<span class="muted">{arrow}</span></th>{cells}</tr>')
    notes = []
    for n, ev in zip(names, evals, strict=True):
        if ev is None:
            notes.append(f"<li>{e(n)}: no {EVAL_JSON} (run <code>cfx eval</code>)</li>")
            continue
        if ev.get("stale"):
            notes.append(f'<li class="warn">{e(n)}: metrics were computed before the run last changed '
                         f"(computed {e(str(ev.get('computed')))}); run <code>cfx eval</code> again</li>")
        for metric, reason in (ev.get("skipped") or {}).items():
            notes.append(f"<li>{e(n)}: {e(str(metric))} skipped: {e(str(reason))}</li>")
    notes_html = f'<ul class="notes">{"".join(notes)}</ul>' if notes else ""
    return (f'<table class="eval"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{notes_html}')


def _run_cards(data: dict) -> str:
    e = html.escape
    cards = []
    for run in data["runs"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in run["parameters"].items())
        c = run["counts"]
        rows = [
            ("method", run["method"]), ("target", run["target"]), ("classifier", run["classifier"]),
            ("model", run["model"]), ("parameters", params or None), ("device", run["device"]),
            ("started", run["started"]),
            ("time", f"{run['seconds']:.1f} s" if run["seconds"] is not None else None),
            ("records", f"{sum(c.values())}: {c['flipped']} flipped, {c['not_flipped']} not flipped, "
                        f"{c['skipped']} skipped, {c['error']} errors"),
        ]
        if run["status"] and run["status"] != "finished":
            rows.append(("status", f"{run['status']} (interrupted or still running)"))
        dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in rows if v is not None)
        cards.append(f'<section class="card"><h2><a href="{e(run["path"])}/">{e(run["name"])}</a></h2>'
                     f"<dl>{dl}</dl></section>")
    return "".join(cards)


def render_page(title: str, data: dict, evals: list[dict | None], names: list[str],
                warnings: list[str]) -> str:
    template = resources.files("cfx_cli").joinpath("report_template.html").read_text(encoding="utf-8")
    warn_html = ""
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings[:50])
        more = f"<li>… and {len(warnings) - 50} more</li>" if len(warnings) > 50 else ""
        warn_html = (f'<details class="warn"><summary>{len(warnings)} warnings</summary>'
                     f"<ul>{items}{more}</ul></details>")
    script = re.search(r"<script>(.*?)</script>", template, re.S)
    if script is None:  # pragma: no cover - the template ships with the package
        raise RuntimeError("report template has no inline script")
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode("utf-8")).digest()).decode()
    replacements = {
        # CSP: only this exact inline script may run, so injected markup could not execute anyway
        "{{SCRIPT_HASH}}": f"sha256-{digest}",
        "{{TITLE}}": html.escape(title),
        "{{RUNS}}": _run_cards(data),
        "{{EVAL}}": _eval_table(evals, names),
        "{{WARNINGS}}": warn_html,
        "{{GENERATED}}": html.escape(data["generated"]),
        "{{DATA}}": _json_for_script(data),
    }
    # one pass, so text substituted for one placeholder is never scanned for another
    pattern = re.compile("|".join(re.escape(k) for k in replacements))
    return pattern.sub(lambda m: replacements[m.group(0)], template)
