"""A white-box classifier around an in-process ``torch.nn.Module`` (capability ``gradients``).

Adapters that load PyTorch models (the demo, TorchScript, Python factories) wrap them in
:class:`TorchModuleClassifier`, which resizes inputs to the model's size differentiably and
counts forward passes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from cfx_cli.classifiers import Classifier, check_probabilities
from cfx_cli.errors import UsageError
from cfx_cli.images import resize_crop_images, resize_images
from cfx_cli.protocol import Option

if TYPE_CHECKING:
    import torch


class TorchModuleClassifier(Classifier):
    capabilities = frozenset({"probabilities", "gradients"})

    def __init__(self, module: torch.nn.Module, labels: list[str], input_size: tuple[int, int] | None,
                 spec: str, device: str = "cpu", returns_logits: bool = True, resize: int | None = None) -> None:
        self.module = module.eval().to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.labels = list(labels)
        self.input_size = tuple(input_size) if input_size else None
        self.spec = spec
        self.device = device
        self.returns_logits = returns_logits
        self.resize = resize  # short side before the centre crop to input_size (#resize=256&size=224)
        self.calls = 0

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, dtype=torch_float())
        if self.resize and self.input_size:
            return resize_crop_images(images, self.resize, self.input_size)
        return resize_images(images, self.input_size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += int(images.shape[0])
        out = self.module(self._prepare(images))
        if not self.returns_logits:
            out = out.clamp_min(1e-12).log()
        return out

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        self.calls += int(images.shape[0])
        out = self.module(self._prepare(images))
        return out if self.returns_logits else torch.logit(out, eps=1e-6)  # #logits=0: sigmoid probabilities

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.logits(images).float(), dim=1).cpu()
        return check_probabilities(probs, images.shape[0], len(self.labels), self.spec)


def torch_float():
    import torch

    return torch.float32


# --------------------------------------------------------------------------- torch-based adapters
def torch_options():
    """Spec options shared by the TorchScript and Python adapters (``SPEC#size=224&mean=...``)."""
    return (
        Option("size", "size", None, "input size N or HxW the model expects (inputs are resized "
                                     "differentiably); default: the model's metadata, else any size"),
        Option("resize", "int", None, "resize the short side to N, then centre-crop to size (the ImageNet "
                                      "evaluation transform: #resize=256&size=224); default: resize to size"),
        Option("mean", "floats", None, "per-channel mean subtracted from [0, 1] inputs (1 or 3 numbers)"),
        Option("std", "floats", None, "per-channel std dividing the inputs after the mean (1 or 3 numbers)"),
        Option("logits", "bool", None, "the model returns logits (default true; false: probabilities)"),
    )


def build_torch_classifier(module, spec: str, options, opts: dict, meta: dict | None = None):
    """Wrap a loaded module with its preprocessing into a :class:`TorchModuleClassifier`.

    Precedence: spec options, then the model's own metadata (``meta``), then defaults. Labels come from
    ``--labels``, the metadata, or ``"0".."K-1"`` with K found by one forward pass.
    """
    import torch

    meta = meta or {}
    size = opts.get("size") or _size(meta.get("input_size"))
    mean = opts.get("mean") or meta.get("mean")
    std = opts.get("std") or meta.get("std")
    returns_logits = opts.get("logits")
    if returns_logits is None:
        returns_logits = bool(meta.get("logits", True))
    if std is not None and any(float(v) == 0 for v in std):
        raise UsageError(f"classifier {spec}: std must not be 0")
    resize = opts.get("resize") or meta.get("resize")
    if resize is not None and (not size or int(resize) < max(size)):
        raise UsageError(f"classifier {spec}: #resize={resize} needs #size=N with N ≤ {resize} (the centre crop "
                         "taken after resizing the short side)")
    if mean is not None or std is not None:
        module = Normalized(module, mean or (0.0, 0.0, 0.0), std or (1.0, 1.0, 1.0))
    labels = options.labels or meta.get("labels")
    if not labels and options.raw_outputs:
        labels = ["0"]  # #binary/#attribute: SigmoidClassifier counts the outputs itself, (N,) included
    if not labels:
        h, w = size or (224, 224)
        try:
            with torch.no_grad():
                out = module.to(options.device).eval()(torch.zeros(1, 3, h, w, device=options.device))
        except Exception as exc:
            raise UsageError(
                f"classifier {spec}: cannot find its number of classes from a test forward pass on a "
                f"{h}×{w} image ({type(exc).__name__}: {str(exc)[:150]}); give the input size with "
                "#size=HxW or the class names with --labels FILE"
            ) from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise UsageError(f"classifier {spec}: the model must return a (N, K) tensor, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        labels = [str(i) for i in range(out.shape[1])]
    return TorchModuleClassifier(module, list(labels), size, spec=spec, device=options.device,
                                 returns_logits=returns_logits, resize=int(resize) if resize else None)


def _size(value) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


@functools.cache
def _normalized_class():
    import torch
    from torch import nn

    class _Normalized(nn.Module):
        """(x − mean) / std in front of a model that expects normalized inputs."""

        def __init__(self, model: nn.Module, mean, std) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return _Normalized


def Normalized(model, mean, std):  # noqa: N802 - a class built lazily so this module never imports torch
    return _normalized_class()(model, mean, std)
