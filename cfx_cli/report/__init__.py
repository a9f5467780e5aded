"""The run report (``report.html``): a static, self-contained gallery of one run or of several runs
side by side. :mod:`.pictures` derives the difference and overlay images, :mod:`.page` renders the
page from its template, :mod:`.build` assembles the gallery data; eval.json (the metrics shown) is
kept by :mod:`cfx_cli.evaluate`."""

from cfx_cli.report.build import REPORT_NAME, build_report, write_run_report

__all__ = ["REPORT_NAME", "build_report", "write_run_report"]
