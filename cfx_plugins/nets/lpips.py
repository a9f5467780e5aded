"""LPIPS (Zhang et al. 2018, v0.1): a VGG-16 or AlexNet trunk, unit-normalized channel features at five
ReLU outputs, squared differences weighted by learned 1×1 "linear" layers, averaged over space, summed.

Two local files: the trunk's ImageNet weights in torchvision's key layout (``features.N.weight``) and the
linear layers (``lin0.model.1.weight`` … ``lin4.model.1.weight``) from the lpips package (``weights/v0.1``).
"""

from __future__ import annotations

import torch
from torch import nn

from cfx_cli.images import resize_images
from cfx_plugins.nets.weights import load_into, load_state_dict, strip_prefix

# (trunk layout as (kind, args)..., indices after which a feature is taken, channels of those features)
_VGG16 = [("conv", 3, 64), ("relu",), ("conv", 64, 64), ("relu",), ("pool2",),
          ("conv", 64, 128), ("relu",), ("conv", 128, 128), ("relu",), ("pool2",),
          ("conv", 128, 256), ("relu",), ("conv", 256, 256), ("relu",), ("conv", 256, 256), ("relu",),
          ("pool2",),
          ("conv", 256, 512), ("relu",), ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",),
          ("pool2",),
          ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",), ("conv", 512, 512), ("relu",)]
_VGG16_TAPS = (3, 8, 15, 22, 29)
_ALEX = [("conv", 3, 64, 11, 4, 2), ("relu",), ("pool3",), ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool3",),
         ("conv", 192, 384, 3, 1, 1), ("relu",), ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",)]
_ALEX_TAPS = (1, 4, 7, 9, 11)

NETS = {
    "vgg": (_VGG16, _VGG16_TAPS, "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": (_ALEX, _ALEX_TAPS, "alexnet-owt-7be5be79.pth",
             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
LIN_URL = ("https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1 "
           "(also inside the lpips wheel on PyPI)")


def _layer(spec) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        cin, cout = spec[1], spec[2]
        k, s, p = spec[3:] if len(spec) > 3 else (3, 1, 1)
        return nn.Conv2d(cin, cout, k, stride=s, padding=p)
    if kind == "relu":
        return nn.ReLU()
    if kind == "pool2":
        return nn.MaxPool2d(2, 2)
    return nn.MaxPool2d(3, 2)


class _Lin(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # index 0 is the (inactive at test time) dropout of the original, so the key is model.1.weight
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        layout, taps, _, _ = NETS[net]
        self.net_name = net
        self.features = nn.Sequential(*[_layer(s) for s in layout])
        self.taps = taps
        channels = [self.features[i - 1].out_channels for i in taps]
        for i, c in enumerate(channels):
            setattr(self, f"lin{i}", _Lin(c))
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances (N,) between images in [0, 1]."""
        fa = self._taps(((2 * a - 1) - self.shift) / self.scale)
        fb = self._taps(((2 * b - 1) - self.shift) / self.scale)
        total = torch.zeros(a.shape[0], device=a.device)
        for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}")((x - y) ** 2).mean(dim=(1, 2, 3))
        return total

    def min_size(self) -> int:
        return 16 if self.net_name == "vgg" else 32


def load(net: str, backbone_path, lin_path) -> LPIPS:
    model = LPIPS(net)
    trunk = strip_prefix(load_state_dict(backbone_path), "features.")
    load_into(model.features, trunk, backbone_path)
    lins = load_state_dict(lin_path)
    lin_modules = nn.ModuleDict({f"lin{i}": getattr(model, f"lin{i}") for i in range(len(model.taps))})
    load_into(lin_modules, lins, lin_path)
    return model.eval()


def resize_for(model: LPIPS, x: torch.Tensor) -> torch.Tensor:
    """The trunk needs a minimum input size (AlexNet's three max-pools): upsample smaller images."""
    m = model.min_size()
    if min(x.shape[-2:]) >= m:
        return x
    return resize_images(x, (max(m, x.shape[-2]), max(m, x.shape[-1])), antialias=False)
