"""The demo's metric networks: independent judges of the digits, trained by ``scripts/train_demo_judges.py`` on
the training split and never on the explained classifier's outputs.

- ``oracle-mlp``: a multilayer perceptron on the grey pixels (no convolution, no pooling).
- ``oracle-rff``: a kernel machine: fixed random Fourier features of the grey pixels (an RBF kernel's
  approximation, Rahimi & Recht 2007) and a trained linear read-out.
- ``features``: a small residual network (GroupNorm, global average pooling) whose pooled 128-d activations are
  the feature space of the demo FID / sFID / S³ (the role Inception and SimSiam play on real images).

None of them shares the explained CNN's architecture (:class:`cfx_cli.demo.classifier.DigitsCNN`: three plain
conv layers, max pooling, two linear layers). Every judge reads the channel mean, so a colour shift is judged by
its luminance. Inputs: (B, 3, 16, 16) in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from cfx_cli.demo import JUDGES_DIR, RESOLUTION

PIXELS = RESOLUTION * RESOLUTION


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] → (B, 1, H, W) centred on 0."""
    return x.mean(dim=1, keepdim=True) * 2 - 1


class OracleMLP(nn.Module):
    def __init__(self, hidden: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden // 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(grey(x))


class OracleRFF(nn.Module):
    """z(x) = √(2/D) cos(W x + b), W ~ N(0, γ⁻²) fixed (buffers), then a linear layer."""

    def __init__(self, features: int = 2048, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("projection", torch.zeros(PIXELS, features))
        self.register_buffer("phase", torch.zeros(features))
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cos(grey(x).flatten(1) @ self.projection + self.phase) * (2.0 / self.phase.numel()) ** 0.5
        return self.head(z)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.skip(x))


class FeatureResNet(nn.Module):
    """16×16 → 32@16×16 → 64@8×8 → 128@4×4 → global average pool (the features) → linear (training only)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.GroupNorm(8, 32), nn.ReLU())
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 128, 2))
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(grey(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"oracle-mlp": OracleMLP, "oracle-rff": OracleRFF,
                                             "features": FeatureResNet}


def weights_path(name: str):
    return JUDGES_DIR / f"{name}.safetensors"


def load_judge(name: str, device: str = "cpu") -> nn.Module:
    """A judge with its committed weights, in eval mode."""
    from safetensors.torch import load_file

    model = ARCHITECTURES[name]()
    model.load_state_dict(load_file(str(weights_path(name))))
    return model.eval().to(device)
