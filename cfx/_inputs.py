"""What ``cfx.explain`` and ``cfx.classify`` accept as images and classifiers, turned into what the CLI takes:
input paths and a classifier spec. In-memory images are written as PNGs (the 8-bit quantisation every input of
the pipeline goes through anyway) so that they are read, resized and recorded exactly like files."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfx import _modules
from cfx_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(eq=False)  # identity semantics: it is a weak-reference key of cfx._modules
class TorchClassifier:
    """A ``torch.nn.Module`` as a cfx classifier (white-box): what ``--classifier python:MODULE:FACTORY`` loads.

    Args:
        module: maps (N, 3, H, W) images in [0, 1] (after ``preprocess``) to (N, K) logits.
        labels: the K class names; default: the module's ``labels`` attribute, else ``"0"``..``"K-1"``.
        input_size: (H, W) (or one int) the module expects; inputs are resized to it differentiably. Default: the
            module's ``input_size`` attribute, else any size.
        preprocess: a differentiable function applied to the [0, 1] images before ``module`` (e.g. normalisation).
        returns_logits: False when ``module`` returns probabilities.

    During a run the module is put in eval mode, its parameters stop requiring gradients and it is moved to the
    run's device; its training mode and ``requires_grad`` flags are restored afterwards (not its device).
    """

    module: Any  # torch.nn.Module
    labels: Sequence[str] | None = None
    input_size: int | tuple[int, int] | None = None
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    returns_logits: bool = True

    def spec(self, key: Any = None) -> str:
        """The ``python:`` spec under which the pipeline loads this classifier (valid while it lives); ``key``:
        the object whose lifetime the name follows (default: this classifier)."""
        spec = f"python:{_modules.MODULE}:{_modules.register(key if key is not None else self, self)}"
        return spec if self.returns_logits else f"{spec}#logits=0"

    def build_module(self) -> Any:
        """The module the ``python:`` adapter wraps: ``module`` behind ``preprocess``, with labels and size."""
        wrapped = _preprocessed_class()(self.module, self.preprocess)
        labels = self.labels if self.labels is not None else getattr(self.module, "labels", None)
        size = self.input_size if self.input_size is not None else getattr(self.module, "input_size", None)
        if labels is not None:
            wrapped.labels = [str(x) for x in labels]
        if size is not None:
            wrapped.input_size = size
        return wrapped


def _preprocessed_class():
    from torch import nn

    class Preprocessed(nn.Module):
        """``module(preprocess(x))``."""

        def __init__(self, module: nn.Module, preprocess) -> None:
            super().__init__()
            self.module, self.preprocess = module, preprocess

        def forward(self, x):
            return self.module(self.preprocess(x) if self.preprocess is not None else x)

    return Preprocessed


def is_torch_module(obj: Any) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == "torch.nn.modules.module.Module" for c in type(obj).__mro__)


def classifier_spec(classifier: Any) -> tuple[str | None, TorchClassifier | None]:
    """(spec, the in-memory classifier it names, if any) for a spec string, an ``nn.Module`` or a
    :class:`TorchClassifier`."""
    if classifier is None or isinstance(classifier, str):
        return classifier, None
    if isinstance(classifier, TorchClassifier):
        return classifier.spec(), classifier
    if is_torch_module(classifier):
        wrapped = TorchClassifier(classifier)
        return wrapped.spec(key=classifier), wrapped
    raise UsageError(f"classifier: expected a spec string, a torch.nn.Module or cfx.TorchClassifier, "
                     f"got {type(classifier).__name__}")


@contextmanager
def borrowed(clf: TorchClassifier | None) -> Iterator[None]:
    """Restore the module's training mode and ``requires_grad`` flags that loading it changes."""
    if clf is None:
        yield
        return
    module = clf.module
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "getbands")


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach") and hasattr(obj, "ndim")


def input_paths(images: Any, folder: Path, ids: Sequence[str] | None = None) -> list[str]:
    """Paths for the pipeline: paths and folders as given; PIL images and tensors written to ``folder`` as PNGs
    named by ``ids``, else by the file name a PIL image was opened from, else ``image-000``, ``image-001``..."""
    if isinstance(images, str | Path) or _is_pil(images):
        items: list[Any] = [images]
    elif _is_tensor(images):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"images: expected a (N, 3, H, W) or (3, H, W) tensor, got {tuple(images.shape)}")
        items = list(images)
    else:
        try:
            items = list(images)
        except TypeError:
            raise UsageError(f"images: expected paths, a folder, PIL images or a tensor, "
                             f"got {type(images).__name__}") from None
    memory = [i for i, x in enumerate(items) if not isinstance(x, str | Path)]
    if ids is not None and len(ids) != len(memory):
        raise UsageError(f"ids: {len(ids)} given for {len(memory)} in-memory images")
    out: list[str] = []
    names: set[str] = set()
    for k, item in enumerate(items):
        if isinstance(item, str | Path):
            out.append(str(item))
            continue
        n = memory.index(k)
        name = ids[n] if ids is not None else _default_name(item, n)
        if not ID_PATTERN.fullmatch(name):
            raise UsageError(f"ids: {name!r} is not a file name (letters, digits, '.', '_', '-')")
        if name in names:
            raise UsageError(f"images: two in-memory images are named {name!r}; give distinct ids")
        names.add(name)
        path = folder / f"{name}.png"
        _write_png(item, path)
        out.append(str(path))
    if not out:
        raise UsageError("images: none given")
    return out


def _default_name(item: Any, n: int) -> str:
    filename = getattr(item, "filename", "") if _is_pil(item) else ""
    stem = Path(filename).stem if filename else ""
    return stem if stem and ID_PATTERN.fullmatch(stem) else f"image-{n:03d}"


def _write_png(item: Any, path: Path) -> None:
    from cfx_cli.images import _to_rgb_array, save_png  # numpy and PIL: only once images are written

    if _is_pil(item):
        save_png(_to_rgb_array(item), path)  # alpha, 16-bit and palette images as the CLI decodes them
    elif _is_tensor(item):
        if item.ndim != 3 or item.shape[0] != 3:
            raise UsageError(f"images: expected (3, H, W) tensors, got {tuple(item.shape)}")
        save_png(item.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), path)
    else:
        raise UsageError(f"images: expected a path, a PIL image or a tensor, got {type(item).__name__}")
