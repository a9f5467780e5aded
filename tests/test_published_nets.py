"""The published classifiers' networks as python: factories (docs/reproduce.md): torchvision's layouts without
torchvision, the authors' checkpoint files read as they are, RCSB's in-model ImageNet transforms."""

from __future__ import annotations

import pytest
import torch

from cfx_plugins.nets.densenet import DenseNet121, celeba_densenet, celebahq_densenet, flatten_authors_checkpoint
from cfx_plugins.nets.imagenet import resnet50_imagenet_transforms
from cfx_plugins.nets.oracle import celeba_oracle, own_key
from cfx_plugins.nets.resnet import ResNet50


def test_densenet121_has_torchvisions_parameters_and_keys():
    net = DenseNet121()
    # torchvision.models.densenet121(): 7,978,856 parameters; its state dict's first and last keys
    assert sum(p.numel() for p in net.parameters()) == 7_978_856
    keys = list(net.state_dict())
    assert keys[0] == "features.conv0.weight" and keys[-1] == "classifier.bias"
    assert "features.denseblock4.denselayer16.conv2.weight" in keys and "features.transition3.conv.weight" in keys
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("factory, outputs, size", [(celeba_densenet, 40, 128), (celebahq_densenet, 3, 256)])
def test_attribute_densenets_read_the_authors_files(factory, outputs, size):
    torch.manual_seed(0)
    src = factory().eval()
    sd = src.state_dict()
    dive = {"feat_extract": {k.removeprefix("feat_extract."): v for k, v in sd.items() if k.startswith("feat_")},
            "classifier": {k.removeprefix("classifier."): v for k, v in sd.items() if k.startswith("classifier.")}}
    steex = {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}, "epoch": 3}
    x = torch.rand(2, 3, size, size)
    for layout in (sd, dive, steex):
        dst = factory().eval()
        dst.load_state_dict(layout)
        assert torch.equal(dst(x), src(x)) and dst(x).shape == (2, outputs)
    assert src.input_size == (size, size)
    with pytest.raises(RuntimeError):
        factory().load_state_dict({"classifier": {"weight": torch.zeros(outputs, 1024)}})  # strict: missing keys
    assert flatten_authors_checkpoint({"a": {"b": torch.ones(1)}, "n": 3}) == {"a.b": torch.ones(1)}


def test_rcsb_resnet50_applies_imagenet1k_transforms_inside():
    torch.manual_seed(0)
    plain = ResNet50().eval()
    model = resnet50_imagenet_transforms().eval()
    model.load_state_dict(plain.state_dict())  # torchvision's resnet50-0676ba61.pth keys, nothing else
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(1, 3, 256, 256)  # the bridge's size: resize 256 is the identity, then the centre 224 crop
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x[..., 16:240, 16:240] - mean) / std), atol=1e-5)
        wide = torch.rand(1, 3, 256, 341)  # short side already 256: only the crop (torchvision rounds the offset)
        assert torch.allclose(model(wide), plain((wide[..., 16:240, 58:282] - mean) / std), atol=1e-5)
    grad = torch.autograd.grad(model(x.requires_grad_())[0, 7], x)[0]
    assert grad[..., :16, :].abs().sum() == 0 and grad[..., 16:240, 16:240].abs().sum() > 0  # the crop is real


def test_celeba_oracle_reads_caffe_names_and_preprocesses_inside():
    torch.manual_seed(0)
    src = celeba_oracle().eval()
    sd = src.state_dict()
    assert own_key("conv3_1_1x1_proj_bn.running_mean") == "net.layer2.0.downsample.1.running_mean"
    assert own_key("conv5_3_3x3.weight") == "net.layer4.2.conv2.weight"
    assert own_key("conv1_7x7_s2_bn.bias") == "net.bn1.bias" and own_key("feat_extract.weight") == "embed.weight"
    inverse = {own_key(k): k for k in _caffe_names(sd)}
    authors = {"feat_extract": {inverse[k]: v for k, v in sd.items() if not k.startswith("classifier.")
                                and not k.endswith("num_batches_tracked")},  # an older file: no batch counts
               "classifier": {"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]}}
    dst = celeba_oracle().eval()
    dst.load_state_dict(authors)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x)) and src(x).shape == (2, 40)
        # the oracle's own preprocessing: BGR, minus the VGGFace2 means / 255, bicubic to 224
        mean = torch.tensor([131.0912, 103.8827, 91.4953]).view(1, 3, 1, 1) / 255
        pre = torch.nn.functional.interpolate(x[:, [2, 1, 0]] - mean, size=(224, 224), mode="bicubic")
        feats = src.embed(src.net.features(pre)[..., None, None]).flatten(1)
        assert torch.allclose(src(x), src.classifier(feats))


def _caffe_names(sd: dict) -> list[str]:
    """Caffe names for every own key (stem, bottleneck parts, embedding), by inverting own_key's rule."""
    parts = {"conv1": "1x1_reduce", "conv2": "3x3", "conv3": "1x1_increase", "downsample.0": "1x1_proj",
             "bn1": "1x1_reduce_bn", "bn2": "3x3_bn", "bn3": "1x1_increase_bn", "downsample.1": "1x1_proj_bn"}
    names = []
    for key in sd:
        if key.startswith("net.layer"):
            _, layer, block, rest = key.split(".", 3)
            part, tensor = rest.rsplit(".", 1)
            names.append(f"conv{int(layer[5:]) + 1}_{int(block) + 1}_{parts[part]}.{tensor}")
        elif key.startswith(("net.conv1.", "net.bn1.")):
            stem = "conv1_7x7_s2" if key.startswith("net.conv1.") else "conv1_7x7_s2_bn"
            names.append(f"{stem}.{key.rsplit('.', 1)[1]}")
        elif key.startswith("embed."):
            names.append("feat_extract.weight")
    return names
