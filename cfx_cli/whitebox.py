"""A white-box classifier around an in-process ``torch.nn.Module`` (capability ``gradients``).

Adapters that load PyTorch models (the demo, TorchScript, Python factories) wrap them in
:class:`TorchModuleClassifier`, which resizes inputs to the model's size differentiably and
counts forward passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfx_cli.classifiers import Classifier, check_probabilities

if TYPE_CHECKING:
    import torch


class TorchModuleClassifier(Classifier):
    capabilities = frozenset({"probabilities", "gradients"})

    def __init__(self, module: torch.nn.Module, labels: list[str], input_size: tuple[int, int] | None,
                 spec: str, device: str = "cpu", returns_logits: bool = True) -> None:
        self.module = module.eval().to(device)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.labels = list(labels)
        self.input_size = tuple(input_size) if input_size else None
        self.spec = spec
        self.device = device
        self.returns_logits = returns_logits
        self.calls = 0

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        images = images.to(self.device, dtype=torch_float())
        if self.input_size and tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=True)
        return images

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += int(images.shape[0])
        out = self.module(self._prepare(images))
        if not self.returns_logits:
            out = out.clamp_min(1e-12).log()
        return out

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            probs = torch.softmax(self.logits(images).float(), dim=1).cpu()
        return check_probabilities(probs, images.shape[0], len(self.labels), self.spec)


def torch_float():
    import torch

    return torch.float32
