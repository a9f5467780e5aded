"""Region sources: where an explainer may change the image (``--region auto|FILE|DIR|SCHEME:ARG``).

A region is a binary float32 (H, W) mask, 1 = may change. This module holds the protocol
(:class:`RegionSource`) and how a ``--region`` spec finds its source; every source, the built-in ones included,
is a plugin registered through the ``register_region_sources`` hook and looked up in the one registry of
:mod:`cfx_cli.plugins`:

- ``auto`` (``cfx_plugins/regions/auto.py``): Integrated-Gradients cells (RCSB §3), ``--set region_area=...``;
- a mask image or a folder of them (``cfx_plugins/regions/file.py``; ``--region FILE|DIR``, alias ``--mask``);
- ``scorecam:LAYER`` / ``gradcam:LAYER`` (``cfx_plugins/regions/cam.py``);
- ``SCHEME:ARG`` of a third-party plugin, e.g. a text-prompted segmenter (``langsam:"the dog"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cfx_cli.errors import UsageError
from cfx_cli.images import InputImage
from cfx_cli.plugins import get_registry

#: the prefix of the ``--set`` keys that go to the region source instead of the explainer
REGION_PREFIX = "region_"


class RegionSource:
    """Base class of region sources. Subclasses registered by plugins set ``scheme`` and implement
    :meth:`mask_for`; they are built as ``cls(arg, options)`` from ``--region SCHEME:ARG``."""

    scheme: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: does mask_for need the image and the classifier (``image=``, ``classifier=``)?
    needs_classifier: ClassVar[bool] = False
    #: the ``--set region_*`` options this source reads, with their defaults (others are refused)
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: False: the scheme alone selects the source, with an empty ARG (``--region auto``)
    takes_arg: ClassVar[bool] = True
    #: True: the source of ``--region FILE|DIR`` (an existing path, or anything no scheme claims)
    handles_paths: ClassVar[bool] = False
    spec: str = ""

    def __init__(self, arg: str, options: dict[str, Any] | None = None) -> None:
        self.arg = arg
        self.options = dict(options or {})

    def check(self, classifier: Any) -> None:
        """Called once with the loaded classifier before any work: raise :class:`UsageError` if this source
        cannot work with it (e.g. it needs gradients from a black box)."""

    def mask_for(self, item: InputImage, size: tuple[int, int], image: np.ndarray | None = None,
                 classifier: Any = None) -> np.ndarray:
        """Binary float32 (H, W) mask for ``item`` at ``size`` (H, W); ``image`` is the (H, W, 3) float input in
        [0, 1] as the explainer will see it. Raise :class:`InputError` for a problem with this input only."""
        raise NotImplementedError


def region_sources() -> dict[str, type[RegionSource]]:
    """scheme → class, from the registry (``register_region_sources`` of every plugin, built-ins first)."""
    return {scheme: cls for scheme, (cls, _plugin) in get_registry().region_sources.items()}


def region_source_class(spec: str) -> tuple[type[RegionSource], str]:
    """The source of a ``--region`` spec and its ARG: a scheme that takes no argument (``auto``), then an existing
    path, then ``SCHEME:ARG`` or a bare ``SCHEME`` (empty ARG); anything else goes to the path source, which says
    the file does not exist."""
    sources = region_sources()
    if spec in sources and not sources[spec].takes_arg:
        return sources[spec], ""
    paths = next((cls for cls in sources.values() if cls.handles_paths), None)
    if paths is not None and Path(spec).exists():
        return paths, spec
    scheme, sep, arg = spec.partition(":")
    cls = sources.get(scheme)
    if cls is not None and cls.takes_arg and (sep or not cls.handles_paths):
        return cls, arg
    if paths is None:
        raise UsageError(f"--region {spec}: no installed region source handles it "
                         f"(installed: {', '.join(sorted(sources)) or 'none'})")
    return paths, spec


def make_region_source(spec: str, options: dict[str, Any] | None = None) -> RegionSource:
    """The region source of ``--region SPEC`` with its ``--set region_*`` options."""
    cls, arg = region_source_class(spec)
    source = cls(arg, options)
    if not source.spec:
        source.spec = spec
    return source


def split_region_options(set_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the explainer's --set options, the ``region_*`` ones); a ``region_*`` key no installed source reads is a
    usage error."""
    region = {k: v for k, v in set_options.items() if k.startswith(REGION_PREFIX)}
    rest = {k: v for k, v in set_options.items() if not k.startswith(REGION_PREFIX)}
    if region:
        known: dict[str, Any] = {}
        for cls in region_sources().values():
            known.update(cls.option_defaults)
        unknown = sorted(set(region) - set(known))
        if unknown:
            raise UsageError(f"--set {unknown[0]}: unknown region option (known: {', '.join(known)})")
    return rest, region
