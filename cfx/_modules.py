"""In-process ``torch.nn.Module`` classifiers, reachable by the ``python:`` classifier adapter.

``cfx.explain(classifier=module)`` registers the module here and hands the pipeline the spec
``python:cfx._modules:NAME``: the adapter imports this module and calls ``NAME()`` (the module-level
``__getattr__`` below), so an in-memory model goes through exactly the loading, preprocessing and checks of
``--classifier python:...``. Entries are weak: a model that is garbage-collected disappears from here too.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

MODULE = __name__
_by_name: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_counter = itertools.count(1)


def register(key: Any, target: Any) -> str:
    """Make ``target`` (a :class:`cfx.TorchClassifier`) loadable under a name that stays the same for as long as
    ``key`` (the target itself, or the plain module it wraps) lives, so that a resumed run sees the same spec."""
    name = _names.get(key)
    if name is None:
        name = f"module_{next(_counter)}"
        _names[key] = name
    _by_name[name] = target
    return name


def __getattr__(name: str) -> Callable[[], Any]:
    obj = _by_name.get(name)
    if obj is None:
        raise AttributeError(name)
    return obj.build_module
