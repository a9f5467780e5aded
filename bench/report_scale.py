"""How the run report scales: writing report.html for synthetic runs of N 16×16 inputs (cold: the
derived heatmaps/overlays are made; warm: they are reused) and opening it in headless Chromium.

    .venv/bin/python bench/report_scale.py [--sizes 300,3000] [--runs 3] [--no-browser]

Prints min / median / max wall seconds per case over the runs, plus the page size. Needs nothing
but the package (the browser column needs Chromium + playwright; see scripts/install-browser.sh).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report_helpers import synthetic_run  # noqa: E402

from cfx_cli.report import build_report  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def open_seconds(context, html: Path) -> float:
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(html.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete)")
    seconds = time.perf_counter() - t0
    page.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="300,3000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    chromium = None if args.no_browser else shutil.which("chromium")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cfx-bench-report-") as tmp:
        ctx_mgr = context = None
        if chromium:
            from playwright.sync_api import sync_playwright

            ctx_mgr = sync_playwright().start()
            context = ctx_mgr.chromium.launch_persistent_context(
                str(Path(tmp) / "profile"), executable_path=chromium, headless=True, args=FLAGS,
                viewport={"width": 1400, "height": 900})
        for n in sizes:
            run = synthetic_run(Path(tmp) / f"run-{n}", n)
            cold, warm, browser = [], [], []
            for _ in range(args.runs):
                shutil.rmtree(run / "report", ignore_errors=True)
                t0 = time.perf_counter()
                html = build_report([run])
                cold.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                build_report([run])
                warm.append(time.perf_counter() - t0)
                if context is not None:
                    browser.append(open_seconds(context, html))
            size_kib = html.stat().st_size / 1024
            for name, ts in (("write, cold", cold), ("write, warm", warm), ("open in Chromium", browser)):
                if ts:
                    rows.append((n, name, min(ts), statistics.median(ts), max(ts), size_kib))
        if context is not None:
            context.close()
            ctx_mgr.stop()
    print(f"{'inputs':>7s}  {'case':18s} {'min':>7s} {'median':>7s} {'max':>7s} {'page KiB':>9s}")
    for n, name, lo, med, hi, kib in rows:
        print(f"{n:7d}  {name:18s} {lo:7.2f} {med:7.2f} {hi:7.2f} {kib:9.0f}")


if __name__ == "__main__":
    main()
