"""The report page: the static HTML template (``template.html``: CSS and JS inline) filled with the
server-rendered header, run cards and metrics table, and the gallery data as a JSON block.

Every string that comes from a manifest or run.json reaches the page either through
:func:`html.escape` (header, run cards, metrics table) or as JSON inside a
``<script type="application/json">`` block read by JS that only ever sets ``textContent``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from importlib import resources
from typing import Any

from cfx_cli.evaluate import EVAL_JSON, format_value

TEMPLATE = "template.html"


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_for_script(data: Any) -> str:
    """JSON that cannot close its <script> element or open a comment, whatever the strings hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _eval_table(evals: list[dict | None], names: list[str]) -> str:
    e = html.escape
    if not any(evals):
        dirs = " ".join(e(n) for n in names)
        return (f'<p class="muted">No metrics yet. <code>cfx eval {dirs}</code> saves them to '
                f"<code>RUN_DIR/{EVAL_JSON}</code> and rewrites <code>RUN_DIR/report.html</code> with them; "
                "a page written elsewhere (<code>--output</code>) shows them after <code>cfx report</code> again.</p>")
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
        vals = [ev["values"].get(c) if ev else None for ev in evals]
        nums = [v for v in vals if finite_number(v) is not None]
        # a direction (arrow; the best value when comparing runs) only for numeric quality columns: the
        # metric gives it (None for the columns it declares unranked), and text such as "hardware" has none
        ranked = c in directions and bool(nums) and all(v is None or finite_number(v) is not None for v in vals)
        arrow = (" ↓" if directions[c] else " ↑") if ranked else ""
        best = (min if directions[c] else max)(nums) if len(nums) > 1 and ranked else None
        cells = "".join(
            f'<td class="{"best" if best is not None and v == best else ""}">{e(format_value(v))}</td>'
            for v in vals
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
        params = ", ".join(f"{k}={format_value(v)}" for k, v in run["parameters"].items())
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
    """The whole page: ``data`` is the gallery (runs and rows), ``evals`` each run's eval.json or None."""
    template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
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
