"""DiME's / ACE's CelebA attribute oracle (``models/oracle.pth``, the MNAC/CD judge) as a ``python:`` factory.

The network (DiME ``eval_utils/oracle_metrics.py``, from BTE ICCV 2021) is the VGGFace2 ``resnet50_128`` in its
Caffe layout — cfx's caffe-layout ResNet-50 (``nets/resnet.py``) plus a 1×1 convolution to a 128-d embedding —
and a linear head of 40 CelebA attribute logits. Its preprocessing runs inside ``forward`` as there: RGB → BGR,
minus the VGGFace2 channel means / 255 on [0, 1] images, bicubic resize to 224². The file holds
``{"feat_extract": Caffe-named tensors (conv1_7x7_s2, conv2_1_1x1_reduce, …, feat_extract), "classifier": …}``;
``load_state_dict`` translates those names (and takes cfx's own keys too)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from cfx_plugins.nets.resnet import ResNet50

VGGFACE2_MEAN_BGR = (131.0912, 103.8827, 91.4953)
_PARTS = {"1x1_reduce": "conv1", "3x3": "conv2", "1x1_increase": "conv3", "1x1_proj": "downsample.0"}
_BNS = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "downsample.0": "downsample.1"}
_CAFFE = re.compile(r"conv(\d)_(\d+)_(1x1_reduce|3x3|1x1_increase|1x1_proj)(_bn)?\.(\w+)$")


def own_key(caffe: str) -> str:
    """``conv3_1_1x1_proj_bn.running_mean`` → ``net.layer2.0.downsample.1.running_mean`` (and the stem, the
    embedding, the head)."""
    if caffe.startswith("conv1_7x7_s2_bn."):
        return "net.bn1." + caffe.split(".", 1)[1]
    if caffe.startswith("conv1_7x7_s2."):
        return "net.conv1." + caffe.split(".", 1)[1]
    if caffe.startswith("feat_extract."):
        return "embed." + caffe.split(".", 1)[1]
    m = _CAFFE.match(caffe)
    if not m:
        return caffe
    stage, block, part, bn, tensor = m.groups()
    name = _PARTS[part]
    return f"net.layer{int(stage) - 1}.{int(block) - 1}.{_BNS[name] if bn else name}.{tensor}"


class CelebAOracle(nn.Module):
    """[0, 1] images → 40 CelebA attribute logits (sigmoid outputs; MNAC counts those that change)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNet50(caffe=True, fc=nn.Identity())
        self.embed = nn.Conv2d(2048, 128, 1, bias=False)
        self.classifier = nn.Linear(128, 40)
        self.register_buffer("mean", torch.tensor(VGGFACE2_MEAN_BGR).view(1, 3, 1, 1) / 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, [2, 1, 0]] - self.mean
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        feats = self.embed(self.net.features(x)[..., None, None]).flatten(1)
        return self.classifier(feats)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        flat = {}
        for key, value in state_dict.items():
            if key == "feat_extract" and isinstance(value, dict):
                flat.update({own_key(k): v for k, v in value.items()})
            elif key == "classifier" and isinstance(value, dict):
                flat.update({f"classifier.{k}": v for k, v in value.items()})
            elif isinstance(value, torch.Tensor):
                flat[key] = value
        for key, value in self.state_dict().items():  # files from before BatchNorm counted its batches
            if key.endswith("num_batches_tracked"):
                flat.setdefault(key, value)
        return super().load_state_dict(flat, strict=strict, assign=assign)


def celeba_oracle() -> CelebAOracle:
    return CelebAOracle()
