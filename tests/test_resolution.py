"""Resolution done right (issue 18): the generator works at its own resolution, inputs reach it from their native
size by short-side resize + centre crop, only the classifier's own preprocessing sits between those images and
the classifier, originals and counterfactuals are saved at the generator's size and the manifest says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cfx
from cfx_cli.backends.pixel import pixel_forward
from cfx_cli.cli import app
from cfx_cli.demo import IMAGES_DIR, LABELS
from cfx_cli.demo.classifier import load_pretrained
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainContext
from cfx_cli.images import crop_box, fit_to_size, load_png, resize_problem, to_working_size
from cfx_cli.models import load_model
from cfx_cli.models.pixel import PixelModel
from cfx_cli.whitebox import TorchModuleClassifier
from tests.conftest import fixture_dir, run_cfx
from tests.tiny_sd import build_tiny_sd

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def _photo(path: Path, w: int = 512, h: int = 384, band: int = 48) -> Path:
    """A w×h picture: red bands at the left and right edges (what a centre crop to a square drops, and what a
    squash would keep), a dark grey field with a light vertical stroke in the middle."""
    arr = np.full((h, w, 3), 40, np.uint8)
    arr[:, :band] = arr[:, w - band:] = (230, 20, 20)
    arr[h // 5: 4 * h // 5, w // 2 - w // 40: w // 2 + w // 40] = 230
    Image.fromarray(arr).save(path)
    return path


# -- the geometry -----------------------------------------------------------------------------------------------
def test_short_side_resize_and_centre_crop_follow_the_papers_loaders():
    # torchvision's Resize(256) + CenterCrop(256) on a 640×480 image: 341×256, then columns 42…297
    assert crop_box((480, 640), (256, 256)) == ((256, 341), (0, 42, 256, 256))
    assert crop_box((640, 480), (256, 256)) == ((341, 256), (42, 0, 256, 256))
    assert crop_box((384, 512), (16, 16)) == ((16, 21), (0, 2, 16, 16))
    rng = np.random.default_rng(0)
    img = rng.random((24, 24, 3)).astype(np.float32)
    assert fit_to_size(img, (24, 24)) is img and fit_to_size(img, None) is img
    assert fit_to_size(img, (12, 12)).shape == (12, 12, 3)  # same aspect: nothing cropped
    assert to_working_size(img, (12, 12))[1] is None
    wide = np.zeros((10, 40, 3), np.float32)
    wide[:, 15:25] = 1.0  # the middle quarter white, the rest black
    out, crop = to_working_size(wide, (10, 10))
    assert out.shape == (10, 10, 3) and crop == [0, 15, 10, 10]
    assert out.min() == 1.0  # only the white middle is left: cropped, not squashed


def test_the_warning_names_the_working_size_and_the_crop():
    assert resize_problem((16, 16), (64, 64)) is None  # 4× exactly: fine
    msg = resize_problem((384, 512), (16, 16), "dime's working size")
    assert msg == ("resized from 512×384 to dime's working size 16×16 (24× smaller, aspect ratio 1.33 → 1.00: "
                   "centre-cropped); the explanation is of the resized image")


# -- the demo prior at its own size only ------------------------------------------------------------------------
def test_the_demo_pixel_prior_and_bridge_refuse_another_size():

    pixel = load_model("demo:pixel", expect="pixel")
    assert pixel.size == (16, 16)
    pixel(torch.zeros(1, 3, 16, 16), 0)  # its own size runs
    with pytest.raises(ValueError, match=r"demo:pixel works at 16×16 only; refusing images of 512×384"):
        pixel(torch.zeros(1, 3, 384, 512), 0)
    with pytest.raises(ValueError, match="works at 16×16 only"):
        pixel_forward(ExplainContext(classifier=None, params={}), pixel, (3, 32, 32))
    bridge = load_model("demo:bridge", expect="bridge")
    with pytest.raises(ValueError, match="demo:bridge works at 16×16 only"):
        bridge(torch.zeros(1, 3, 32, 32), 1)


class _AnySize(torch.nn.Module):
    """A classifier that declares no input size (it resizes inside, as many user models do): before issue 18 it
    let the generator run at the input's native size."""

    def __init__(self) -> None:
        super().__init__()
        self.net = load_pretrained("cpu")
        self.seen: list[tuple[int, int]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.net(torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))


def test_a_photo_with_a_size_agnostic_classifier_keeps_dime_on_the_16x16_prior(tmp_path, monkeypatch, capsys):
    shapes: list[tuple[int, int]] = []
    call = PixelModel.__call__

    def counted(self, x, t, y=None):
        shapes.append(tuple(x.shape[-2:]))
        return call(self, x, t, y)

    monkeypatch.setattr(PixelModel, "__call__", counted)
    photo = _photo(tmp_path / "photo.png")
    module = _AnySize()
    out = tmp_path / "run"
    cfx.explain([photo], "dime", classifier=cfx.TorchClassifier(module, labels=LABELS), out=out,
                params={"respacing": "10", "tau": 3, "scales": "10", "perceptual": "l2"}, device="cpu")
    assert shapes and set(shapes) == {(16, 16)}  # a few prior calls, none at 512×384
    assert set(module.seen) == {(16, 16)}  # the classifier is given the generator's images
    (rec,) = _records(out)
    assert rec["status"] in ("flipped", "not_flipped")
    assert rec["source_size"] == [384, 512] and rec["size"] == [16, 16] and rec["crop"] == [0, 49, 384, 390]
    assert json.loads((out / "run.json").read_text())["working_size"] == [16, 16]
    assert "resized from 512×384 to dime's working size 16×16" in capsys.readouterr().err


def test_a_photo_with_the_demo_is_centre_cropped_warned_about_and_recorded(tmp_path):
    (tmp_path / "in").mkdir()
    photo = _photo(tmp_path / "in" / "photo.png")
    out = tmp_path / "run"
    proc = run_cfx("explain", str(photo), "--method", "pgd", "--set", "iterations=2", "--out", str(out),
                   env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: {photo}: resized from 512×384 to pgd's working size 16×16 (24× smaller, aspect ratio "
            "1.33 → 1.00: centre-cropped); the explanation is of the resized image") in proc.stderr.splitlines()
    assert ", 1 resized >4× or cropped (" in proc.stdout
    (rec,) = _records(out)
    assert rec["source_size"] == [384, 512] and rec["size"] == [16, 16] and rec["crop"] == [0, 49, 384, 390]
    original = load_png(out / rec["original"])
    assert original.shape == (16, 16, 3)
    red = (original[..., 0] > 0.5) & (original[..., 1] < 0.3)
    assert not red.any()  # the red edge bands were cropped away (a squash to 16×16 keeps 1–2 red columns each)
    assert int(original[4:12].mean(axis=(0, 2)).argmax()) in (7, 8)  # the stroke stays in the middle


# -- a generator at 64² with the 16×16 demo classifier ----------------------------------------------------------
@pytest.fixture(scope="module")
def sd64(tmp_path_factory) -> Path:
    """The tiny random SD folder, its UNet on 32² latents so that the VAE (×2) works at 64²."""
    folder = build_tiny_sd(fixture_dir("time-edict"), tmp_path_factory.mktemp("sd64") / "sd")
    for sub, side in (("unet", 32), ("vae", 64)):
        cfg = folder / sub / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "sample_size": side}, indent=2))
    return folder


@pytest.fixture
def seen_by_classifier(monkeypatch):
    """(size given to the demo classifier, size its network receives) of every call."""
    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    prepare = TorchModuleClassifier._prepare

    def recorded(self, images):
        out = prepare(self, images)
        calls.append((tuple(images.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(TorchModuleClassifier, "_prepare", recorded)
    return calls


def _inputs(folder: Path) -> Path:
    """Two demo digits (16², brought up 4×: no warning), a 16×8 strip (aspect 2) and a 300² picture (4.7×)."""
    folder.mkdir()
    for name in ("digit-00-label0", "digit-07-label7"):
        (folder / f"{name}.png").write_bytes((IMAGES_DIR / f"{name}.png").read_bytes())
    Image.new("RGB", (16, 8), (200, 200, 200)).save(folder / "strip.png")
    Image.new("RGB", (300, 300), (90, 90, 90)).save(folder / "large.png")
    return folder


ECED_TINY = {"preset": "imagenet", "iterations": 1, "bg_iterations": 1, "steps": 10, "tau": 2}


def test_eced_on_a_64px_vae_with_the_16px_demo_classifier(sd64, tmp_path, seen_by_classifier, capsys):
    out = tmp_path / "run"
    inputs = _inputs(tmp_path / "in")
    cfx.explain([inputs], "eced", model=f"diffusers:{sd64}", params=ECED_TINY, out=out, device="cpu",
                batch_size=4)
    err = capsys.readouterr().err
    recs = {r["id"]: r for r in _records(out)}
    assert len(recs) == 4 and all(r["status"] in ("flipped", "not_flipped") for r in recs.values()), recs
    for r in recs.values():
        assert r["size"] == [64, 64]
        assert load_png(out / r["original"]).shape == (64, 64, 3)
        assert load_png(out / r["counterfactual"]).shape == (64, 64, 3)
        assert load_png(out / r["mask"]).shape[:2] == (64, 64)
    assert recs["digit-00-label0"]["source_size"] == [16, 16] and recs["digit-00-label0"]["crop"] is None
    assert recs["strip"]["source_size"] == [8, 16] and recs["strip"]["crop"] == [0, 4, 8, 8]
    assert recs["large"]["source_size"] == [300, 300] and recs["large"]["crop"] is None
    # the classifier is given the 64² images and applies its own 16×16 preprocessing to them, every time
    assert seen_by_classifier and set(seen_by_classifier) == {((64, 64), (16, 16))}
    warned = sorted(line for line in err.splitlines() if line.startswith("warning: "))
    assert warned == [
        f"warning: {inputs / 'large.png'}: resized from 300×300 to eced's working size 64×64 (4.69× smaller); the "
        "explanation is of the resized image",
        f"warning: {inputs / 'strip.png'}: resized from 16×8 to eced's working size 64×64 (8× larger, aspect ratio "
        "2.00 → 1.00: centre-cropped); the explanation is of the resized image"]
    info = json.loads((out / "run.json").read_text())
    assert info["working_size"] == [64, 64] and info["resized_inputs"] == 2
    # cfx eval and the report read originals and counterfactuals at 64² with a 16² classifier
    ev = run_cfx("eval", str(out), "--metrics", "flip_rate,target_prob,distance,bg_mse,cout", env=ONE_THREAD)
    assert ev.returncode == 0, ev.stderr
    assert (out / "eval.json").exists() and (out / "report.html").exists()
    results = cfx.load(out)
    assert tuple(results.by_id("strip").original.shape) == (3, 64, 64)


def test_time_fits_and_explains_at_the_vae_resolution(sd64, tmp_path, seen_by_classifier, demo_images):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("digit-00-label0", "digit-07-label7"):  # tokens for classes 0 and 7
        (data / f"{name}.png").write_bytes((demo_images / f"{name}.png").read_bytes())
    tokens = tmp_path / "tokens"
    res = CliRunner().invoke(app, ["fit", "time", "--data", str(data), "--out", str(tokens), "--model",
                                   f"diffusers:{sd64}", "--set", "iterations=1", "--set", "batch_size=2"])
    assert res.exit_code == 0, res.output
    assert seen_by_classifier and set(seen_by_classifier) == {((64, 64), (16, 16))}  # the fit's scan
    seen_by_classifier.clear()
    out = tmp_path / "run"
    cfx.explain([data], "time", target="7", model=f"diffusers:{sd64}", out=out, device="cpu",
                params={"tokens": str(tokens), "steps": 10, "schedule": "2:1"})
    recs = _records(out)
    assert len(recs) == 2 and all(r["status"] != "error" for r in recs), recs
    for r in recs:
        assert r["size"] == [64, 64] and r["source_size"] == [16, 16]
    by_id = {r["id"]: r for r in recs}
    assert by_id["digit-07-label7"]["status"] == "skipped"  # already a 7
    assert load_png(out / by_id["digit-00-label0"]["counterfactual"]).shape == (64, 64, 3)
    assert seen_by_classifier and set(seen_by_classifier) == {((64, 64), (16, 16))}


def test_set_resolution_moves_the_latent_methods_working_size(sd64, tmp_path):
    out = tmp_path / "run"
    inputs = _inputs(tmp_path / "in")
    cfx.explain([inputs], "eced", model=f"diffusers:{sd64}", params={**ECED_TINY, "resolution": 32}, out=out,
                device="cpu", limit=1)
    (rec,) = _records(out)
    assert rec["size"] == [32, 32] and load_png(out / rec["original"]).shape == (32, 32, 3)
    with pytest.raises(UsageError, match=r"--set resolution=30: must be a multiple of 4"):
        cfx.explain([inputs], "eced", model=f"diffusers:{sd64}", params={**ECED_TINY, "resolution": 30},
                    out=tmp_path / "bad", device="cpu", limit=1)
