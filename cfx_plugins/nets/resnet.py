"""ResNet-50 in the two layouts the metrics' published weights use.

- ``torchvision`` layout (SimSiam's ``checkpoint_0099.pth.tar`` holds one under ``module.encoder.``): the
  stride of a down-sampling bottleneck sits in its 3×3 conv, the stem max-pool pads by 1.
- ``caffe`` layout (VGGFace2 ``resnet50_ft_weight.pkl``, converted from Caffe): the stride sits in the first
  1×1 conv, the stem max-pool has no padding and rounds up (ceil mode), the head is a 7×7 average pool.
Keys are identical in both: ``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1-3}/bn{1-3}/downsample.{0,1}``, ``fc``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfx_plugins.nets.weights import load_into, load_state_dict, strip_prefix


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, caffe: bool) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if caffe else (1, stride)
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """Images already normalized as the weights expect → pooled features (N, 2048) from :meth:`features`."""

    def __init__(self, caffe: bool = False, fc: nn.Module | None = None) -> None:
        super().__init__()
        self.caffe = caffe
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(cin, planes, stride if b == 0 else 1, caffe))
                cin = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.fc = fc if fc is not None else nn.Linear(2048, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.caffe:
            x = F.max_pool2d(x, 3, stride=2, padding=0, ceil_mode=True)
        else:
            x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.caffe:
            x = F.avg_pool2d(x, 7, stride=1)  # the published head: 224×224 inputs give a 7×7 map
        else:
            x = F.adaptive_avg_pool2d(x, 1)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def simsiam_projector(dim: int = 2048) -> nn.Sequential:
    """SimSiam's 3-layer projection MLP that replaces ``fc`` (keys ``fc.0, fc.1, fc.3, fc.4, fc.6, fc.7``)."""
    return nn.Sequential(
        nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
        nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
        nn.Linear(2048, dim), nn.BatchNorm1d(dim, affine=False),
    )


SIMSIAM_FILE = "checkpoint_0099.pth.tar"
SIMSIAM_URL = "https://dl.fbaipublicfiles.com/simsiam/models/100ep/pretrain/checkpoint_0099.pth.tar"
VGGFACE2_FILE = "resnet50_ft_weight.pkl"
VGGFACE2_URL = "https://github.com/cydonia999/VGGFace2-pytorch (Google Drive link in its README)"


def load_simsiam(path) -> ResNet50:
    """SimSiam encoder: ResNet-50 + projector; its output z is what S³ compares (ACE's code)."""
    state = load_state_dict(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for prefix in ("module.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = strip_prefix(state, prefix)
            break
    net = ResNet50(caffe=False, fc=simsiam_projector())
    load_into(net, state, path)
    return net


def load_vggface2(path) -> ResNet50:
    net = ResNet50(caffe=True, fc=nn.Linear(2048, 8631))
    load_into(net, load_state_dict(path), path)
    return net
