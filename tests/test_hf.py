"""``hf:`` classifiers (transformers image classifiers with their processor, in torch) and ``--region clipseg:``,
on tiny random models built offline from configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cfx
from hf_helpers import LABELS, make_clipseg, make_resnet, make_vit

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.errors import InputError, UsageError

pytest.importorskip("transformers")

#: max |Δp| between cfx and the library's processor + model where a resize happens (PIL rounds the resized pixels
#: to 8 bits, cfx's differentiable resize does not); measured on the 16 demo digits with these random models:
#: 4.4e-4 (ResNet, bicubic 16→18 + centre crop 16) and 1.9e-5 (ViT, bilinear 16→32) — docs/classifiers/hf.md
RESIZE_BOUND = 2e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import BitImageProcessor, DeiTImageProcessor

    root = tmp_path_factory.mktemp("hf")
    deit = DeiTImageProcessor(size={"height": 20, "width": 20}, crop_size={"height": 16, "width": 16})
    bit = BitImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16})
    return {
        "vit-deit": make_vit(root / "deit", processor=deit),  # bicubic 16 → 20, centre crop 16
        "vit-bit": make_vit(root / "bit", processor=bit),  # short edge bicubic 16 → 18, centre crop 16
        "vit": make_vit(root / "vit"),  # 16×16 in, processor at 16×16: no resize on the demo digits
        "vit-resize": make_vit(root / "vit32", image_size=32, processor_size=32),  # bilinear 16 → 32
        "resnet": make_resnet(root / "resnet", crop_pct=1.0),  # ConvNeXT rule, short edge 16/1.0 = 16: no resize
        "resnet-resize": make_resnet(root / "resnet875", crop_pct=0.875),  # bicubic 16 → 18, centre crop 16
    }


@pytest.fixture(scope="module")
def digits():
    from PIL import Image

    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.images import decode

    paths = sorted(IMAGES_DIR.glob("*.png"))
    return [Image.open(p).convert("RGB") for p in paths], np.stack([decode(p) for p in paths])


def _delta(folder, digits) -> float:
    """max |Δp| between cfx's ``hf:`` classifier and the library's own processor + model on the demo digits."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    pil, arrays = digits
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(**processor(images=pil, return_tensors="pt")).logits.softmax(-1)
    clf = load_classifier(f"hf:{folder}", ClassifierOptions())
    ours = clf.predict_proba(torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy()))
    return float((ours - ref).abs().max())


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_probabilities_equal_the_librarys_processor_and_model_without_resize(models, digits, name):
    assert _delta(models[name], digits) <= 1e-5


@pytest.mark.parametrize("name", ["vit-resize", "resnet-resize", "vit-deit", "vit-bit"])
def test_probabilities_with_a_resize_stay_within_the_stated_bound(models, digits, name):
    delta = _delta(models[name], digits)
    assert delta <= RESIZE_BOUND
    assert delta > 1e-7  # a resize happened (else this test checks nothing the one above does not)


def test_labels_gradients_and_description(models, digits):
    import torch

    clf = load_classifier(f"hf:{models['resnet-resize']}", ClassifierOptions())
    assert clf.labels == [LABELS[i] for i in range(10)] and clf.label_index("digit 3") == 3
    assert clf.input_size is None and "gradients" in clf.capabilities  # any size: the processor resizes
    info = clf.describe()
    assert info["preprocessing"]["processor"] == "ConvNextImageProcessor"
    assert info["preprocessing"]["crop_pct"] == 0.875 and info["problem_type"] == "single_label_classification"
    x = torch.from_numpy(digits[1][:2].transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    clf.logits(x)[:, 3].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # an input of another size and aspect goes through the same steps as the library's (short edge, crop)
    big = torch.rand(1, 3, 20, 28)
    assert clf.predict_proba(big).shape == (1, 10)
    # the saliency regions (--region gradcam:/scorecam:) read the model's layers through the processor's steps
    from cfx_cli.saliency import find_layer, grad_cam

    layer, _ = find_layer(clf, None)
    assert layer.startswith("model.resnet.")
    cam = grad_cam(clf, layer, x.detach(), torch.tensor([3, 3]))
    assert cam.shape == (2, 16, 16) and float(cam.max()) <= 1.0


def test_multi_label_models_report_the_softmax_with_a_note(tmp_path, capsys):
    make_vit(tmp_path / "ml", problem_type="multi_label_classification")
    clf = load_classifier(f"hf:{tmp_path / 'ml'}", ClassifierOptions())
    assert clf.describe()["problem_type"] == "multi_label_classification"
    assert "softmax" in capsys.readouterr().err


def test_a_processor_cfx_does_not_reproduce_is_refused(models, tmp_path):
    import shutil

    folder = tmp_path / "offset"
    shutil.copytree(models["vit"], folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.update(image_processor_type="EfficientNetImageProcessor", rescale_offset=True, include_top=False)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="cannot reproduce its image processor"):
        load_classifier(f"hf:{folder}", ClassifierOptions())


def test_missing_weights_and_files_are_one_line(models, tmp_path):
    r = run_cfx("classify", str(tmp_path), "-c", "hf:nobody/no-such-classifier", env={"HF_HUB_CACHE": str(tmp_path)})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "https://huggingface.co/nobody/no-such-classifier" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert "not found in the Hugging Face cache" in lines[0]
    import shutil

    folder = tmp_path / "noweights"
    shutil.copytree(models["vit"], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="has no model.safetensors"):
        load_classifier(f"hf:{folder}", ClassifierOptions())
    with pytest.raises(UsageError, match="no such folder"):
        load_classifier(f"hf:{tmp_path / 'absent'}", ClassifierOptions())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "dime"])
def test_explain_through_an_hf_classifier(models, tmp_path, demo_images, method):
    from cfx_cli.images import decode

    out = tmp_path / method
    # DiME without a paper preset needs VGG19 weights for its perceptual term: this test chooses the pixel MSE
    small = ["--set", "iterations=5"] if method == "pgd" else ["--set", "respacing=20", "--set", "tau=2",
                                                               "--set", "scales=20", "--set", "perceptual=l2"]
    r = run_cfx("explain", str(demo_images), "--limit", "2", "--method", method, "--target", "1",
                "-c", f"hf:{models['vit']}", "--out", str(out), *small)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(rec["status"] in ("flipped", "not_flipped", "skipped") for rec in recs)
    assert any(rec["counterfactual"] for rec in recs)
    for rec in recs:
        if rec["counterfactual"]:
            assert decode(out / rec["counterfactual"]).shape == (16, 16, 3)
            assert rec["target_label"] == "digit 1"
    run = json.loads((out / "run.json").read_text())
    assert run["classifier"]["preprocessing"]["processor"] == "ViTImageProcessor"


# -- --region clipseg:PROMPT -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clipseg(tmp_path_factory):
    return make_clipseg(tmp_path_factory.mktemp("clipseg") / "clipseg")


def _source(clipseg, prompt="the digit", **options):
    from cfx_cli.regions import make_region_source

    return make_region_source(f"clipseg:{prompt}", {"region_model": str(clipseg), **options})


def test_clipseg_masks_shape_determinism_and_threshold(clipseg, digits):
    from cfx_cli.images import InputImage

    image = digits[1][0]
    item = InputImage(id="d0", path=Path("d0.png"))
    src = _source(clipseg)
    mask = src.mask_for(item, (16, 16), image=image)
    assert mask.shape == (16, 16) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert (mask == src.mask_for(item, (16, 16), image=image)).all()  # deterministic
    assert (mask == _source(clipseg).mask_for(item, (16, 16), image=image)).all()  # and across loads
    assert src.mask_for(item, (24, 40), image=image).shape == (24, 40)  # at the explainer's size
    areas = [_source(clipseg, region_threshold=t).mask_for(item, (16, 16), image=image).mean()
             for t in (0.2, 0.4, 0.5, 0.6)]
    assert areas == sorted(areas, reverse=True) and areas[0] > areas[-1]  # a higher threshold, a smaller region
    probs = src.probabilities(image, (16, 16))
    assert ((probs > 0.5) == mask.astype(bool)).all()
    other = _source(clipseg, prompt="a cat").probabilities(image, (16, 16))
    assert np.abs(other - probs).max() > 1e-3  # the prompt matters
    with pytest.raises(InputError, match="no pixel"):
        _source(clipseg, region_threshold=0.999).mask_for(item, (16, 16), image=image)


def test_clipseg_errors_are_one_line(tmp_path, demo_images, clipseg):
    with pytest.raises(UsageError, match="region_threshold"):
        _source(clipseg, region_threshold=1.5)
    with pytest.raises(UsageError, match="give the text"):
        _source(clipseg, prompt=" ")
    r = run_cfx("explain", str(demo_images), "--limit", "1", "--method", "pgd", "--region", "clipseg:the mouth",
                "--out", str(tmp_path / "x"), env={"HF_HUB_CACHE": str(tmp_path)})
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "CIDAS/clipseg-rd64-refined" in lines[0] and "https://huggingface.co/CIDAS/clipseg-rd64-refined" in lines[0]
    assert "region_model" in lines[0] and not (tmp_path / "x" / "manifest.jsonl").exists()


@pytest.mark.slow
def test_cli_pgd_with_a_clipseg_region_keeps_pixels_outside_it(tmp_path, demo_images, clipseg):
    from cfx_cli.images import decode

    out = tmp_path / "run"
    r = run_cfx("explain", str(demo_images), "--limit", "2", "--method", "pgd", "--target", "3", "--region",
                "clipseg:the digit", "--set", f"region_model={clipseg}", "--set", "region_threshold=0.4",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["mask"] == "clipseg:the digit" and run["region_options"]["region_threshold"] == 0.4
    recs = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        orig, cf = decode(out / rec["original"]), decode(out / rec["counterfactual"])
        mask = decode(out / rec["mask"]).mean(axis=2) > 0.5
        assert 0 < mask.mean() < 1
        assert (orig[~mask] == cf[~mask]).all()  # bit-identical outside the region
        assert (orig[mask] != cf[mask]).any()


# -- cfx models: cached transformers image classifiers ---------------------------------------------------------------
def _cache_repo(hub, repo_id: str, files: dict[str, str] | None = None, copy_from=None):
    """A Hugging Face cache entry (models--ORG--NAME/snapshots/COMMIT, refs/main) holding ``files`` or a folder."""
    import shutil

    commit = "0" * 40
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    if copy_from is not None:
        shutil.copytree(copy_from, snap)
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (snap / name).write_text(text)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow  # three CLI subprocesses
def test_cfx_models_lists_cached_image_classifiers_which_load_offline(models, tmp_path, demo_images):
    hub = tmp_path / "hub"
    _cache_repo(hub, "someorg/tiny-vit", copy_from=models["vit"])
    _cache_repo(hub, "someorg/text-model", {"config.json": json.dumps({"architectures": ["BertModel"]})})
    _cache_repo(hub, "someorg/resnet-cls", {"config.json": json.dumps(
        {"architectures": ["ResNetForImageClassification"], "id2label": {"0": "cat", "1": "dog"}})})
    env = {"HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path)}
    r = run_cfx("models", "--json", env=env)
    assert r.returncode == 0, r.stderr
    found = {c["spec"]: c for c in json.loads(r.stdout)["classifiers"]}
    assert sorted(found) == ["hf:someorg/resnet-cls", "hf:someorg/tiny-vit"]
    assert found["hf:someorg/tiny-vit"]["architecture"] == "ViTForImageClassification"
    assert found["hf:someorg/tiny-vit"]["num_labels"] == 10 and found["hf:someorg/tiny-vit"]["size_bytes"] > 0
    assert found["hf:someorg/resnet-cls"]["num_labels"] == 2
    text = run_cfx("models", env=env).stdout
    assert "cached transformers image classifiers" in text and "hf:someorg/tiny-vit" in text
    r = run_cfx("classify", str(demo_images / "digit-03-label3.png"), "-c", "hf:someorg/tiny-vit", env=env)
    assert r.returncode == 0, r.stderr
    assert "digit" in r.stdout
