"""ScoreCAM / Grad-CAM maps, ECED's key region (alg. 1) and the scorecam:/gradcam: region sources."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from adapter_helpers import write_cmd_program
from conftest import run_cfx
from torch import nn

from cfx_cli import saliency
from cfx_cli.errors import InputError, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    """(demo module, the demo classifier, the 16 demo images (16, 3, 16, 16), their predicted classes)."""
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.demo.classifier import load_pretrained
    from cfx_cli.images import decode, discover

    module = load_pretrained()
    clf = load_classifier("demo:digits", ClassifierOptions())
    x = torch.from_numpy(np.stack([decode(i.path) for i in discover([str(IMAGES_DIR)])])).permute(0, 3, 1, 2)
    with torch.no_grad():
        pred = module(x).argmax(1)
    return module, clf, x.float().contiguous(), pred


# ------------------------------------------------------------------------------------------ maps on demo:digits
@pytest.mark.parametrize("fn", [saliency.score_cam, saliency.grad_cam])
def test_maps_have_the_input_shape_and_span_0_to_1(digits, fn):
    module, clf, x, pred = digits
    maps = fn(module, None, x, pred)
    assert maps.shape == (16, 16, 16) and maps.dtype == torch.float32
    flat = maps.reshape(16, -1)
    assert torch.all(flat.min(1).values == 0) and torch.allclose(flat.max(1).values, torch.ones(16))
    # the white-box classifier (its own logits, resizing, normalisation) gives the same maps as the bare module
    assert torch.allclose(fn(clf, None, x, pred), maps, atol=1e-5)


def test_score_cam_batching_does_not_change_the_map(digits):
    module, _, x, pred = digits
    ref = saliency.score_cam(module, None, x[:3], pred[:3], batch_size=64)
    for bs in (1, 7):  # chunk boundaries inside the 64 channels
        assert torch.allclose(saliency.score_cam(module, None, x[:3], pred[:3], batch_size=bs), ref, atol=1e-5)


def test_score_cam_matches_the_per_channel_definition(digits):
    """An independent per-channel loop of the formula in the docstring (weights: softmax probability of the
    masked input, no baseline) on two images."""
    import torch.nn.functional as F

    module, _, x, pred = digits
    store = {}
    handle = module.features[6].register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        module(x[:2])
    handle.remove()
    for i in range(2):
        total = torch.zeros(16, 16)
        for k in range(store["a"].shape[1]):
            up = F.interpolate(store["a"][i:i + 1, k:k + 1], size=(16, 16), mode="bilinear", align_corners=False)
            if up.max() == up.min():
                continue
            h = (up - up.min()) / (up.max() - up.min())
            with torch.no_grad():
                w = torch.softmax(module(x[i:i + 1] * h), 1)[0, pred[i]]
            total += w * up[0, 0]
        total = torch.relu(total)
        expect = (total - total.min()) / (total.max() - total.min())
        assert torch.allclose(saliency.score_cam(module, "features.6", x[i:i + 1], pred[i:i + 1])[0], expect,
                              atol=1e-5)


def test_maps_follow_the_input_size_through_the_classifiers_resize(digits):
    _, clf, x, pred = digits
    big = torch.nn.functional.interpolate(x[:4], size=(32, 32), mode="bilinear", align_corners=False)
    for fn in (saliency.score_cam, saliency.grad_cam):
        maps = fn(clf, None, big, pred[:4])  # the classifier resizes 32 → 16 inside its forward
        assert maps.shape == (4, 32, 32) and float(maps.amax()) == pytest.approx(1.0)


def test_baseline_subtraction_zeroes_the_maps_of_the_class_of_a_black_image(digits):
    """The documented reason the zero-image baseline is off by default: demo:digits calls a black image "1"."""
    module, _, x, pred = digits
    with torch.no_grad():
        assert int(module(torch.zeros(1, 3, 16, 16)).argmax()) == 1
    ones = (pred == 1).nonzero().flatten()
    assert len(ones) == 2
    with_base = saliency.score_cam(module, None, x[ones], pred[ones], subtract_baseline=True)
    assert float(with_base.max()) == 0.0
    assert torch.all(saliency.score_cam(module, None, x[ones], pred[ones]).reshape(2, -1).amax(1) == 1)


# ------------------------------------------------------------------------------------------ sanity: known location
class ColourNet(nn.Module):
    """Class 0 = "red", class 1 = "green": colour detectors (1×1 conv) → ReLU → global average → linear.
    Each class's evidence sits wherever its colour blob is, and nowhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        with torch.no_grad():  # channel c responds to colour c above the mean of the other two
            self.features[0].weight.copy_((torch.eye(3) * 1.5 - 0.5)[:, :, None, None] * 4)
            self.features[0].bias.fill_(-0.3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[40.0, -20.0, 0.0], [-20.0, 40.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _blob_images(n: int, seed: int = 0):
    """n 32×32 grey-noise images with a 5×5 red blob in one quadrant and a green one in another, and the
    two quadrants (row, col)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.1
    red_q, green_q = [], []
    for i in range(n):
        order = torch.randperm(4, generator=g)
        for q, colour, keep in ((QUADRANTS[order[0]], 0, red_q), (QUADRANTS[order[1]], 1, green_q)):
            r0 = q[0] * 16 + int(torch.randint(1, 10, (1,), generator=g))
            c0 = q[1] * 16 + int(torch.randint(1, 10, (1,), generator=g))
            x[i, :, r0:r0 + 5, c0:c0 + 5] = 0.1
            x[i, colour, r0:r0 + 5, c0:c0 + 5] = 0.9
            keep.append(q)
    return x, red_q, green_q


def _mass_in(maps: torch.Tensor, quads) -> torch.Tensor:
    out = []
    for m, (r, c) in zip(maps, quads, strict=True):
        out.append(m[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].sum() / m.sum())
    return torch.stack(out)


@pytest.mark.parametrize("fn", [saliency.score_cam, saliency.grad_cam])
def test_maps_concentrate_on_the_blob_of_the_explained_class(fn):
    net = ColourNet().eval()
    x, red_q, green_q = _blob_images(12)
    with torch.no_grad():
        probs = torch.softmax(net(x), 1)
    assert torch.all(probs.max(1).values < 0.99)  # neither class saturates: both blobs matter
    assert saliency.default_layer(net) == "features.1"
    red = fn(net, None, x, 0)
    green = fn(net, None, x, 1)
    # the same images, two classes: the map moves to the quadrant of that class's blob
    assert float(_mass_in(red, red_q).min()) > 0.8
    assert float(_mass_in(green, green_q).min()) > 0.8
    assert float(_mass_in(red, green_q).max()) < 0.1
    region = saliency.key_region(red, 0.5)
    assert float(_mass_in(region, red_q).min()) == 1.0  # the key region lies inside the red quadrant


# ------------------------------------------------------------------------------------------ deletion (faithfulness)
def test_deleting_top_scorecam_pixels_drops_the_class_more_than_random_pixels(digits):
    """Deletion check on the 16 demo images: setting the 30% highest-ScoreCAM pixels to the background (0)
    lowers the predicted class's probability far more than 30% random pixels (20 draws)."""
    module, _, x, pred = digits
    rows = torch.arange(16)
    k = int(0.3 * 256)

    def prob_drop(idx):
        keep = torch.ones(16, 256)
        keep.scatter_(1, idx, 0.0)
        with torch.no_grad():
            before = torch.softmax(module(x), 1)[rows, pred]
            after = torch.softmax(module(x * keep.view(16, 1, 16, 16)), 1)[rows, pred]
        return before - after

    cam = saliency.score_cam(module, None, x, pred)
    cam_drop = prob_drop(cam.reshape(16, -1).topk(k, dim=1).indices)
    g = torch.Generator().manual_seed(0)
    rand_drop = torch.stack([prob_drop(torch.stack([torch.randperm(256, generator=g)[:k] for _ in range(16)]))
                             for _ in range(20)]).mean(0)
    # measured: 0.96 vs 0.15
    assert float(cam_drop.mean()) > float(rand_drop.mean()) + 0.5
    assert int((cam_drop > rand_drop).sum()) >= 15


# ------------------------------------------------------------------------------------------ layers
def test_default_layer_is_the_last_conv_rectified():
    conv_bn_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert saliency.default_layer(conv_bn_relu) == "3"
    conv_then_pool = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4, 2))
    assert saliency.default_layer(conv_then_pool) == "2"
    with pytest.raises(UsageError, match="no Conv2d"):
        saliency.default_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


def test_a_bad_layer_name_lists_the_conv_layers(digits):
    module, clf, x, pred = digits
    assert saliency.default_layer(clf) == "features.6"
    with pytest.raises(UsageError) as err:
        saliency.score_cam(clf, "features.99", x[:1], pred[:1])
    msg = str(err.value)
    assert "'features.99'" in msg and "features.0, features.2, features.5" in msg and "\n" not in msg
    with pytest.raises(UsageError, match=r"head\.1.*not \(N, C, h, w\)"):
        saliency.grad_cam(module, "head.1", x[:1], pred[:1])


def test_black_box_and_torchscript_classifiers_are_refused_in_one_line(tmp_path):
    from adapter_helpers import export_torchscript

    from cfx_cli.classifiers import Classifier, ClassifierOptions, load_classifier

    class Remote(Classifier):
        spec = "http://example.invalid/classify"
        labels = ["a", "b"]

    for fn in (saliency.score_cam, saliency.grad_cam):
        with pytest.raises(UsageError, match=r"white-box.*http://example.invalid/classify.*--region FILE\|DIR"):
            fn(Remote(), None, torch.zeros(1, 3, 8, 8), 0)
    ts = load_classifier(f"torchscript:{export_torchscript(tmp_path / 'm.pt')}", ClassifierOptions())
    with pytest.raises(UsageError, match="TorchScript"):
        saliency.default_layer(ts)


# ------------------------------------------------------------------------------------------ threshold, latent mask
def test_key_region_is_strictly_above_the_threshold():
    u = torch.tensor([[[0.0, 0.25, 0.5], [0.5001, 0.75, 1.0]]])
    assert saliency.key_region(u, 0.5).tolist() == [[[0, 0, 0], [1, 1, 1]]]
    assert saliency.key_region(u, 0.0).sum() == 5  # u > 0: the zero pixel is out
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(UsageError, match=r"\[0, 1\)"):
            saliency.key_region(u, bad)


def test_latent_mask_rules():
    m = torch.zeros(2, 1, 16, 16)
    m[0, 0, 4:8, 4:8] = 1  # aligned with the 2×2 cells: every rule agrees
    m[1, 0, 5, 5] = 1  # one pixel, not a cell centre
    for mode in ("nearest", "any", "majority"):
        out = saliency.latent_mask(m, (8, 8), mode=mode)
        assert out.shape == (2, 1, 8, 8)
        assert out[0, 0].nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    # a pixel no latent-cell centre samples: nearest would lose it, so it falls back to "any" (never empty)
    assert saliency.latent_mask(m, (8, 8))[1, 0].nonzero().tolist() == [[2, 2]]
    assert saliency.latent_mask(m, (8, 8), mode="majority")[1].sum() == 0

    line = torch.zeros(16, 16)
    line[:, 6] = 1  # one column: touches cells of column 3, half of each cell
    assert saliency.latent_mask(line, (8, 8), mode="any")[:, 3].sum() == 8
    assert saliency.latent_mask(line, (8, 8), mode="majority")[:, 3].sum() == 8
    # nearest samples pixel 7 of cell 3, not this column: empty, so the "any" fallback keeps the line
    assert saliency.latent_mask(line, (8, 8))[:, 3].sum() == 8
    # nearest samples the cell centre like PIL's NEAREST resize (Blended Latent Diffusion's code)
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    rnd = (torch.rand(24, 24, generator=g) > 0.6).float()
    pil = np.asarray(Image.fromarray((rnd.numpy() * 255).astype(np.uint8)).resize((6, 6), Image.NEAREST)) > 127
    assert np.array_equal(saliency.latent_mask(rnd, (6, 6)).numpy() > 0, pil)
    with pytest.raises(UsageError, match="latent mask mode"):
        saliency.latent_mask(m, (8, 8), mode="bilinear")


# ------------------------------------------------------------------------------------------ region sources
def test_region_source_mask_is_the_thresholded_map_of_the_predicted_class(digits):
    from cfx_cli.images import discover
    from cfx_cli.regions import make_region_source

    module, clf, x, pred = digits
    items = discover([str(__import__("cfx_cli.demo", fromlist=["IMAGES_DIR"]).IMAGES_DIR)])
    src = make_region_source("gradcam:features.7", {"region_threshold": 0.3})
    src.check(clf)
    assert src.options == {"region_threshold": 0.3, "layer": "features.7"}
    mask = src.mask_for(items[4], (16, 16), image=x[4].permute(1, 2, 0).numpy(), classifier=clf)
    expect = saliency.key_region(saliency.grad_cam(module, "features.7", x[4:5], pred[4:5]), 0.3)[0]
    assert mask.dtype == np.float32 and np.array_equal(mask, expect.numpy())
    with pytest.raises(UsageError, match="region_threshold"):
        make_region_source("scorecam:", {"region_threshold": 1.0})


def test_region_source_refuses_an_all_zero_map_for_that_input_only(digits):
    """Layer features.5 (the raw conv) gives all-zero ScoreCAM maps on most demo images: one InputError line."""
    from cfx_cli.images import discover
    from cfx_cli.regions import make_region_source

    _, clf, x, _ = digits
    items = discover([str(__import__("cfx_cli.demo", fromlist=["IMAGES_DIR"]).IMAGES_DIR)])
    src = make_region_source("scorecam:features.5")
    src.check(clf)
    with pytest.raises(InputError, match=r"digit-00-label0.png: the ScoreCAM map of class 0 at layer features.5"):
        src.mask_for(items[0], (16, 16), image=x[0].permute(1, 2, 0).numpy(), classifier=clf)


def test_cli_scorecam_region_end_to_end(tmp_path, demo_images, digits):
    from cfx_cli.images import decode

    module, _, x, pred = digits
    out = tmp_path / "run"
    res = run_cfx("explain", str(demo_images), "--method", "pgd", "--target", "auto", "--region", "scorecam:",
                  "--classifier", "demo:digits", "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["mask"] == "scorecam:" and run["region_options"] == {"region_threshold": 0.5, "layer": "features.6"}
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["mask"] for r in records)
    expect = saliency.key_region(saliency.score_cam(module, None, x, pred), 0.5).numpy()
    for i, rec in enumerate(sorted(records, key=lambda r: r["id"])):
        saved = decode(out / rec["mask"])[..., 0] > 0.5
        assert np.array_equal(saved, expect[i] > 0), rec["id"]
        cf, orig = decode(out / rec["counterfactual"]), decode(out / rec["original"])
        assert np.all(np.abs(cf - orig).max(axis=2)[~saved] < 1e-6)  # PGD changed nothing outside the key region


def test_region_option_errors_come_before_any_work(tmp_path, demo_images):
    from cfx_cli.explain.pipeline import run_explain
    from cfx_cli.explain.request import ExplainRequest

    cases = [
        ("scorecam:nope", {}, "CAM layer 'nope' is not a module"),
        ("gradcam:", {"region_threshold": "1.5"}, "region_threshold=1.5: must be in [0, 1)"),
        ("scorecam:", {"region_area": "0.2"}, "--region scorecam: reads region_threshold"),
        ("auto", {"region_threshold": "0.4"}, "--region auto reads region_area"),
        ("scorecam:", {"region_thresh": "0.4"}, "unknown region option"),
        ("scorecam:head.1", {}, "not (N, C, h, w) feature maps"),
    ]
    for region, options, message in cases:
        req = ExplainRequest(inputs=[str(demo_images)], method="pgd", limit=1, out=str(tmp_path / "r"),
                             device="cpu", mask=region, set_options=options)
        with pytest.raises(UsageError) as err:
            run_explain(req)
        assert message in str(err.value), (region, str(err.value))
        assert not (tmp_path / "r").exists()  # refused before the run directory is made


def test_cli_black_box_classifier_gets_one_line(tmp_path, demo_images):
    prog = write_cmd_program(tmp_path)
    res = run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "1", "--region", "scorecam:",
                  "--classifier", f"cmd:{sys.executable} {prog}", "--out", str(tmp_path / "r"),
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "ScoreCAM needs a white-box" in lines[0] and "--region FILE|DIR" in lines[0]
    assert not (tmp_path / "r").exists()


def test_region_sources_are_registered_and_listed():
    from cfx_cli.plugins import get_registry
    from cfx_cli.regions import region_sources

    sources = region_sources()
    assert sources["scorecam"].__name__ == "ScoreCamRegion" and sources["gradcam"].__name__ == "GradCamRegion"
    assert sources["auto"].__name__ == "AutoRegion" and sources["file"].__name__ == "MaskSource"
    reg = get_registry(warn=False)
    assert reg.region_sources["scorecam"][1] == "regions_cam"
    assert reg.plugins["regions_cam"].region_sources == ["scorecam", "gradcam"]
    assert reg.region_sources["auto"][1] == "regions_auto" and reg.region_sources["file"][1] == "regions_file"


class Bottleneck(nn.Module):
    """torchvision's ResNet block layout: conv/bn ×3, one shared in-place ReLU (registered after bn3), residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x
        return self.relu(out)


def test_resnet_style_block_default_layer_is_the_block_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Bottleneck(8), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3)).eval()
    assert saliency.default_layer(net) == "2.relu"  # read at its last call: the block's output
    x = torch.rand(2, 3, 12, 12)
    store = {}
    handle = net[2].register_forward_hook(lambda m, i, o: store.update(block=o.detach().clone()))
    grad_cam_maps = saliency.grad_cam(net, None, x, [0, 1])
    handle.remove()
    assert saliency.probe_layer(net, None, (12, 12)) == ("2.relu", (1, 8, 12, 12))
    # Grad-CAM from the block output read directly: α = mean gradient of the logit = the linear weight / (h·w)
    alpha = net[5].weight[[0, 1]] / 144
    expect = torch.relu((alpha[:, :, None, None] * store["block"]).sum(1))
    expect = (expect - expect.amin((1, 2), keepdim=True)) / (expect.amax((1, 2), keepdim=True)
                                                             - expect.amin((1, 2), keepdim=True))
    assert torch.allclose(grad_cam_maps, expect, atol=1e-5)
    assert saliency.score_cam(net, None, x, [0, 1]).shape == (2, 12, 12)
