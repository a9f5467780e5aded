"""torchvision's ResNet-50 with its ImageNet weights' own preprocessing inside ``forward``, as a ``python:``
classifier factory: RCSB's classifier (``src/classifiers/resnet50.py`` applies ``ResNet50_Weights.IMAGENET1K_V1
.transforms()`` to [0, 1] images inside the model: short side resized to 256, centre crop 224, ImageNet mean/std),
which a spec's ``#size=224`` (a plain resize, no crop) does not express. Weights: torchvision's
``resnet50-0676ba61.pth``, key for key."""

from __future__ import annotations

import torch

from cfx_cli.classifiers import IMAGENET_MEAN, IMAGENET_STD
from cfx_cli.images import resize_images
from cfx_plugins.nets.resnet import ResNet50

RESIZE, CROP = 256, 224  # IMAGENET1K_V1's ImageClassification(crop_size=224, resize_size=256)


class TransformsResNet50(ResNet50):
    """[0, 1] images of any size → 1000 logits, through resize 256 (bilinear, antialiased) → crop 224 → mean/std."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        short = min(h, w)  # torchvision's Resize(256): short side 256, long side truncated
        x = resize_images(x, (RESIZE if h == short else int(RESIZE * h / short),
                              RESIZE if w == short else int(RESIZE * w / short)))
        top, left = round((x.shape[-2] - CROP) / 2), round((x.shape[-1] - CROP) / 2)  # torchvision's CenterCrop
        x = x[..., top : top + CROP, left : left + CROP]
        return super().forward((x - self.mean) / self.std)


def resnet50_imagenet_transforms() -> TransformsResNet50:
    return TransformsResNet50()
