"""The SimSiam and VGGFace2 ResNet-50s and LPIPS load files in the published key layouts and give features
of the right shape; weights that are missing, malformed or malicious give one line naming the file."""

from __future__ import annotations

import pickle

import pytest
import torch
from metric_weights import lpips_files, simsiam_file, vggface2_file

from cfx_cli.errors import MetricUnavailable


@pytest.mark.slow
def test_simsiam_checkpoint_layout_loads(tmp_path):
    from cfx_plugins.nets.resnet import load_simsiam

    path = simsiam_file(tmp_path / "checkpoint_0099.pth.tar")
    state = torch.load(path, weights_only=True)["state_dict"]
    for key, shape in {
        "module.encoder.conv1.weight": (64, 3, 7, 7),
        "module.encoder.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "module.encoder.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "module.encoder.fc.0.weight": (2048, 2048),
        "module.encoder.fc.6.bias": (2048,),
        "module.encoder.fc.7.running_var": (2048,),
        "module.predictor.0.weight": (512, 2048),
    }.items():
        assert tuple(state[key].shape) == shape
    net = load_simsiam(path)
    with torch.no_grad():
        z = net(torch.rand(3, 3, 32, 32))
    assert z.shape == (3, 2048) and torch.isfinite(z).all()
    # torchvision layout: the stride of a down-sampling block sits in its 3×3 conv
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)


@pytest.mark.slow
def test_vggface2_pickle_layout_loads_and_code_in_pickles_is_refused(tmp_path):
    from cfx_plugins.nets.resnet import load_vggface2
    from cfx_plugins.nets.weights import load_state_dict

    path = vggface2_file(tmp_path / "resnet50_ft_weight.pkl")
    net = load_vggface2(path)
    assert net.layer2[0].conv1.stride == (2, 2)  # Caffe layout: stride in the first 1×1 conv
    assert net.fc.weight.shape == (8631, 2048)
    with torch.no_grad():
        f = net.features(torch.rand(2, 3, 224, 224) * 255)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(MetricUnavailable, match=r"evil.pkl: cannot read weights .*refusing to load"):
        load_state_dict(bad)
    # a torch file goes through the one checkpoint reader (weights_only): refused, without a --trust-pickle hint
    # (cfx eval has no such option), and a file that is not a state dict says so
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MetricUnavailable, match=r"evil.pt: cannot read weights \(a full pickle, which cfx eval never"):
        load_state_dict(tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MetricUnavailable, match=r"list.pt: cannot read weights \(expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_loads_torchvision_trunk_and_lin_layers(tmp_path, net):
    from cfx_plugins.nets import lpips

    trunk, lin = lpips_files(tmp_path, net)
    model = lpips.load(net, trunk, lin)
    channels = [getattr(model, f"lin{i}").model[1].weight.shape[1] for i in range(5)]
    assert channels == ([64, 128, 256, 512, 512] if net == "vgg" else [64, 192, 384, 256, 256])
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        a, b = lpips.resize_for(model, a), lpips.resize_for(model, b)
        d_ab, d_ba, d_aa = model(a, b), model(b, a), model(a, a)
    assert d_ab.shape == (2,) and (d_ab > 0).all()
    assert torch.allclose(d_ab, d_ba) and torch.allclose(d_aa, torch.zeros(2))


def test_missing_and_wrong_weights_name_the_file(tmp_path):
    from cfx_cli.metrics import MetricContext
    from cfx_plugins.nets.resnet import SIMSIAM_FILE, SIMSIAM_URL, load_simsiam
    from cfx_plugins.nets.weights import WeightsSpec, resolve

    spec = WeightsSpec("simsiam_weights", "CFX_TEST_UNSET_VAR", SIMSIAM_FILE, SIMSIAM_URL)
    with pytest.raises(MetricUnavailable) as exc:
        resolve(MetricContext(), spec)
    msg = str(exc.value)
    assert "checkpoint_0099.pth.tar" in msg and "dl.fbaipublicfiles.com/simsiam" in msg and "\n" not in msg
    with pytest.raises(MetricUnavailable, match="nope.tar: no such file"):
        resolve(MetricContext(options={"simsiam_weights": str(tmp_path / "nope.tar")}), spec)
    torch.save(
        {"state_dict": {"module.encoder.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "partial.tar"
    )
    with pytest.raises(MetricUnavailable, match="partial.tar: not the expected weights .*missing"):
        load_simsiam(tmp_path / "partial.tar")
