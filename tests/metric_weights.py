"""Random-weight files in the exact key layouts of the published metric weights, for tests.

Convolutions get He-normal weights (fan-in, ReLU gain) so that activations stay of order one through deep
random networks; otherwise the features of a random Inception vanish and every FID is ~0.
"""

from __future__ import annotations

import pickle
from pathlib import Path


def _he_init(module, seed: int) -> None:
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()


def inception_file(path: Path) -> Path:
    import torch

    from cfx_plugins.nets.inception import FIDInceptionV3

    net = FIDInceptionV3()
    _he_init(net, 0)
    torch.save(net.state_dict(), path)
    return path


def simsiam_file(path: Path) -> Path:
    """Like ``checkpoint_0099.pth.tar``: epoch, arch, state_dict (module.encoder.*, module.predictor.*)."""
    import torch
    from torch import nn

    from cfx_plugins.nets.resnet import ResNet50, simsiam_projector

    enc = ResNet50(fc=simsiam_projector())
    _he_init(enc, 1)
    predictor = nn.Sequential(
        nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 2048)
    )
    state = {f"module.encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"module.predictor.{k}": v for k, v in predictor.state_dict().items()})
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state}, path)
    return path


def vggface2_file(path: Path) -> Path:
    """Like ``resnet50_ft_weight.pkl``: a pickled dict of numpy arrays, no num_batches_tracked."""
    from torch import nn

    from cfx_plugins.nets.resnet import ResNet50

    net = ResNet50(caffe=True, fc=nn.Linear(2048, 8631))
    _he_init(net, 2)
    arrays = {k: v.numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)
    return path


def lpips_files(folder: Path, net: str = "vgg") -> tuple[Path, Path]:
    """A torchvision-layout trunk (``features.N.*`` plus an unused ``classifier.*``) and the lin layers."""
    import torch

    from cfx_plugins.nets.lpips import LPIPS

    model = LPIPS(net)
    _he_init(model.features, 3)
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(4, 4)
    g = torch.Generator().manual_seed(4)
    lins = {
        f"lin{i}.model.1.weight": torch.rand(getattr(model, f"lin{i}").model[1].weight.shape, generator=g)
        for i in range(5)
    }
    torch.save(trunk, folder / f"{net}-trunk.pth")
    torch.save(lins, folder / f"{net}-lin.pth")
    return folder / f"{net}-trunk.pth", folder / f"{net}-lin.pth"
