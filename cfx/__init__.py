"""cfx from Python: visual counterfactual explanations of image classifiers, and their evaluation.

The same machinery as the ``cfx`` command (presets, automatic presets, regions, backends, resume), one call
each::

    import cfx

    results = cfx.explain("digits/", method="dime", classifier="demo:digits")
    results.grid()                      # original | counterfactual | difference, a PIL image
    cfx.evaluate(results)               # the metric table, one dict per run
    cfx.method("dime").params           # name, kind, default, bounds, help

``import cfx`` imports neither torch nor numpy nor PIL; they load when a function needs them. See
docs/python-api.md.
"""

from __future__ import annotations

from cfx._inputs import TorchClassifier
from cfx.api import MethodInfo, ParamInfo, classify, demo_images, evaluate, explain, load, method, methods
from cfx.results import Result, Results
from cfx_cli import __version__
from cfx_cli.errors import CfxError, UsageError

__all__ = [
    "CfxError",
    "MethodInfo",
    "ParamInfo",
    "Result",
    "Results",
    "TorchClassifier",
    "UsageError",
    "__version__",
    "classify",
    "demo_images",
    "evaluate",
    "explain",
    "load",
    "method",
    "methods",
]
