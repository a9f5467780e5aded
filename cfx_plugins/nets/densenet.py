"""DenseNet-121 in torchvision's layout, and the two published CelebA attribute classifiers built on it, as
``python:`` classifier factories that read the authors' checkpoint files as they are.

- ``celeba_densenet``: DiME's / ACE's CelebA classifier (DiVE's DenseNet-121, 40 attribute logits, 128² input
  in [-1, 1]); the file (``classifier.pth``) holds ``{"feat_extract": …, "classifier": …}``.
- ``celebahq_densenet``: STEEX's CelebA-HQ ``DecisionDensenetModel`` (3 logits: gender, smile, young; 256²
  input in [-1, 1]); the file (``celebamaskhq/checkpoint.tar``) holds ``{"model_state_dict": …, …}``.

Both map [0, 1] images to logits only after the spec's ``#mean=0.5&std=0.5`` (the authors' [-1, 1]); pick one
attribute of the sigmoid outputs with the classifier option ``#attribute=…`` (docs/reproduce.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROWTH, BN_SIZE, BLOCKS = 32, 4, (6, 12, 24, 16)  # DenseNet-121 (Huang et al. 2017; torchvision densenet121)


class DenseLayer(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, BN_SIZE * GROWTH, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(BN_SIZE * GROWTH)
        self.conv2 = nn.Conv2d(BN_SIZE * GROWTH, GROWTH, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(out)))], 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet121(nn.Module):
    """torchvision's ``densenet121`` key for key (``features.conv0`` … ``features.norm5``); ``classifier`` is
    ``None`` in the authors' feature extractor (they replace it by an identity), so ``forward`` gives the pooled
    1024 features then."""

    def __init__(self, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(64))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        c = 64
        for i, n in enumerate(BLOCKS, 1):
            block = nn.Sequential()
            for j in range(n):
                block.add_module(f"denselayer{j + 1}", DenseLayer(c + j * GROWTH))
            self.features.add_module(f"denseblock{i}", block)
            c += n * GROWTH
            if i < len(BLOCKS):
                self.features.add_module(f"transition{i}", Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.num_features = c
        self.classifier = nn.Linear(c, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)
        return self.classifier(x) if self.classifier is not None else x


class _FeatureExtractor(nn.Module):
    """The authors' ``DenseNet121`` wrapper (keys ``feat_extract.features.*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.feat_extract = DenseNet121(num_classes=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat_extract(x)


class AttributeDenseNet(nn.Module):
    """DenseNet-121 features + a linear head of ``num_attributes`` logits, with the authors' module names
    (``feat_extract.feat_extract.features.*``, ``classifier.*``). ``load_state_dict`` also takes the authors'
    nested files: ``{"model_state_dict": sd}`` (STEEX) or ``{"feat_extract": sd, "classifier": sd}`` (DiVE)."""

    def __init__(self, num_attributes: int, input_size: int, labels: list[str] | None = None) -> None:
        super().__init__()
        self.feat_extract = _FeatureExtractor()
        self.classifier = nn.Linear(self.feat_extract.feat_extract.num_features, num_attributes)
        self.input_size = (input_size, input_size)
        if labels:
            self.labels = labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feat_extract(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(flatten_authors_checkpoint(state_dict), strict=strict, assign=assign)


def flatten_authors_checkpoint(state: dict) -> dict:
    """One flat state dict from the authors' layouts: unwrap ``model_state_dict``/``state_dict`` and prefix the
    entries of nested dicts with their key (``{"classifier": {"weight": …}}`` → ``classifier.weight``)."""
    for key in ("model_state_dict", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
    return flat


def celeba_densenet() -> AttributeDenseNet:
    """DiME's / ACE's CelebA classifier: 40 attribute logits at 128² (``classifier.pth``)."""
    return AttributeDenseNet(40, 128)


def celebahq_densenet() -> AttributeDenseNet:
    """STEEX's CelebA-HQ classifier: 3 logits (0 male, 1 smiling, 2 young) at 256² (``checkpoint.tar``)."""
    return AttributeDenseNet(3, 256)
