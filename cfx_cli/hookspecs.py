"""The plugin hooks of cfx: the only module a plugin author needs to read.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, exposed through the
``cfx`` entry-point group. Each ``register_*`` hook receives a ``register`` callback; call it once per
class you provide (``register_commands`` receives the command line instead). Registration must be cheap:
import torch, diffusers or onnxruntime inside the methods of your classes, never at module level, so that
``cfx`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from cfx_cli.classifiers import ClassifierAdapter
    from cfx_cli.explainers import Explainer
    from cfx_cli.metrics import Metric
    from cfx_cli.regions import RegionSource

PROJECT = "cfx"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_explainers(register: Callable[[type[Explainer]], None]) -> None:
    """Register counterfactual explainers (``--method NAME``).

    Call ``register(cls)`` with a subclass of :class:`cfx_cli.explainers.Explainer`. The class
    attribute ``name`` is the method name; it must be unique across all installed plugins (a
    duplicate is refused with a warning naming both plugins). ``requires`` lists the classifier
    capabilities the method needs (``{"gradients"}`` for white-box methods); ``params`` documents
    the hyperparameters that ``--set KEY=VALUE`` accepts and ``cfx methods NAME`` prints.
    """


@hookspec
def register_classifier_adapters(register: Callable[[type[ClassifierAdapter]], None]) -> None:
    """Register classifier adapters (``--classifier SCHEME:...``).

    Call ``register(cls)`` with a subclass of :class:`cfx_cli.classifiers.ClassifierAdapter`. Its
    ``schemes`` (e.g. ``("http", "https")``) are the spec prefixes it handles; each scheme may be
    claimed by one plugin only.
    """


@hookspec
def register_metrics(register: Callable[[type[Metric]], None]) -> None:
    """Register evaluation metrics (``cfx eval --metrics NAME,...``).

    Call ``register(cls)`` with a subclass of :class:`cfx_cli.metrics.Metric`. ``needs`` states
    what the metric requires (``"classifier"``, ``"masks"``, ``"seeds"``, weights...), so that
    ``cfx eval`` can skip it with a one-line reason instead of failing.
    """


@hookspec
def register_region_sources(register: Callable[[type[RegionSource]], None]) -> None:
    """Register region sources (``--region SCHEME:ARG``), e.g. a text-prompted segmenter.

    Call ``register(cls)`` with a subclass of :class:`cfx_cli.regions.RegionSource` whose ``scheme``
    (e.g. ``"langsam"``) is the prefix it handles; the built-in ``auto``, ``file``, ``scorecam`` and ``gradcam``
    are registered the same way (``cfx_plugins/regions/``) and load first, and the first plugin to claim a scheme
    keeps it. cfx builds ``cls(arg, options)`` once per run from
    ``--region SCHEME:ARG`` (``arg`` is everything after the first colon, e.g. a text prompt; ``options`` holds
    the ``--set region_*`` values) and calls ``mask_for(item, (H, W), image=..., classifier=...)`` per input; it
    returns a float32 (H, W) array in {0, 1}, 1 = may change. Load heavy models lazily in ``mask_for``, never at
    import time. Example (a plugin module)::

        class LangSAM(RegionSource):
            scheme = "langsam"
            summary = "text-prompted segmentation (LangSAM)"

            def mask_for(self, item, size, image=None, classifier=None):
                return run_langsam(image, prompt=self.arg, size=size)  # your model

        @hookimpl
        def register_region_sources(register):
            register(LangSAM)
    """


@hookspec
def register_commands(cli: typer.Typer, fit: typer.Typer) -> None:
    """Add commands to the ``cfx`` command line (like llm's ``register_commands``).

    ``cli`` is the root :class:`typer.Typer` (``@cli.command()`` adds ``cfx NAME``); ``fit`` is the group of
    learning stages (``@fit.command("NAME")`` adds ``cfx fit NAME``, e.g. TIME's ``cfx fit time``). Take only
    the arguments you use. The hook runs whenever ``cfx`` starts, so keep it cheap: define the command here and
    import heavy libraries inside its body. A plugin that raises here is reported by ``cfx plugins``; the other
    commands keep working. Example::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello(name: str = "world") -> None:
                print(f"hello {name}")
    """
