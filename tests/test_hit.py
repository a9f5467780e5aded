"""HiT (thesis ch. 6): the exact decomposition, parity with the authors' model code, the demo model, the adapter,
``--region hit`` and the insertion/deletion metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cfx_plugins.classifiers.hit.model import HiT, HiTConfig

FIXTURE = Path(__file__).parent / "fixtures" / "hit-ref"

CONFIGS = {
    "pooled, width 8→12→16": HiTConfig(image_size=32, patch_size=4, num_heads=2, num_classes=5, blocks=(2, 1, 2),
                                       block_dims=(8, 12, 16)),
    "pooled, one width": HiTConfig(image_size=16, patch_size=2, num_heads=4, num_classes=3, blocks=(2, 2, 1),
                                   block_dims=(16, 16, 16)),
    "no pool": HiTConfig(image_size=16, patch_size=4, num_heads=3, num_classes=4, blocks=(4,), block_dims=(12,),
                         pool=False),
    "no positions, no final LN": HiTConfig(image_size=16, patch_size=4, num_heads=2, num_classes=6, blocks=(2, 2),
                                           block_dims=(8, 8), use_pos_tokens=False, ln_at_the_end=False),
}


def _random_model(config: HiTConfig, seed: int = 0) -> HiT:
    torch.manual_seed(seed)
    model = HiT(config).eval()
    with torch.no_grad():  # perturb everything: the zero-initialised head and class token would hide terms
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decomposition_sums_to_the_logits_per_patch_and_per_layer(name):
    config = CONFIGS[name]
    model = _random_model(config)
    x = torch.randn(5, 3, config.image_size, config.image_size)
    with torch.no_grad():
        logits = model(x)
        d = model.decompose(x)
        assert d.terms.shape == (5, config.num_layers, config.grid ** 2, config.block_dims[-1])
        assert (d.logits - logits).abs().max() < 1e-5
        patch = d.patch_map()
        assert patch.shape == (5, config.num_classes, config.grid, config.grid)
        assert (patch.sum((2, 3)) + d.bias - logits).abs().max() < 1e-5
        layer = d.layer_map()
        assert layer.shape == (5, config.num_classes, config.num_layers)
        assert (layer.sum(2) + d.bias - logits).abs().max() < 1e-5
        # every (layer, patch) term at once, and the class-selected shortcut
        assert (d.class_terms().sum((1, 2)) + d.bias - logits).abs().max() < 1e-5
        cls = logits.argmax(1)
        assert torch.allclose(d.patch_map(cls), patch[torch.arange(5), cls], atol=1e-6)
        assert torch.allclose(d.layer_map(cls), layer[torch.arange(5), cls], atol=1e-6)
        # the terms are of the normalised CLS token itself
        ln = model.encoder.ln
        final = ln(d.cls) if ln is not None else d.cls
        assert (d.terms.sum((1, 2)) - final).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["pooled, one width", "no pool"])
def test_the_cls_after_every_layer_is_the_sum_of_the_earlier_terms(name):
    """Each layer split of the residual stream: CLS after layer l = initial CLS + Σ_{l' ≤ l} Σ_p raw[l', p]."""
    config = CONFIGS[name]
    model = _random_model(config, seed=1)
    x = torch.randn(3, 3, config.image_size, config.image_size)
    seen = []
    blocks = [blk for _, layers in model.encoder.stages() for blk in layers]
    hooks = [blk.register_forward_hook(lambda _m, _i, out: seen.append(out[1][:, 0])) for blk in blocks]
    with torch.no_grad():
        model(x)
        d = model.decompose(x)
    for h in hooks:
        h.remove()
    assert len(seen) == config.num_layers
    for layer, cls in enumerate(seen):
        partial = d.initial + d.raw[:, : layer + 1].sum((1, 2))
        assert (partial - cls).abs().max() < 1e-5, layer


def test_rollout_is_the_mean_attention_and_sums_to_one():
    config = CONFIGS["pooled, width 8→12→16"]
    model = _random_model(config)
    with torch.no_grad():
        roll = model.rollout(torch.randn(2, 3, 32, 32))
    assert roll.shape == (2, config.grid, config.grid)
    assert torch.allclose(roll.sum((1, 2)), torch.ones(2), atol=1e-5)  # each layer's attention sums to 1


def test_config_from_the_authors_yaml_sections():
    c = HiTConfig.from_authors("hit", {"image_size": 224, "blocks": [4, 4, 4], "num_heads": 6,
                                       "block_dims": [384, 384, 384], "mlp_ratio": 4, "num_classes": 1000,
                                       "patch_size": 8, "use_pos_tokens": True, "block_version": "hit",
                                       "attention_dropout": 0.2})
    assert c.num_layers == 12 and c.grid == 28 and c.pool
    assert HiTConfig.from_authors(**c.to_authors()) == c
    flat = HiTConfig.from_authors("hit-no-pool", {"num_layers": 12, "hidden_dim": 384, "patch_size": 16})
    assert flat.blocks == (12,) and not flat.pool
    with pytest.raises(ValueError, match="block_version"):
        HiTConfig.from_authors("hit", {"block_version": "vit"})
    with pytest.raises(ValueError, match="unknown HiT parameter 'depth'"):
        HiTConfig.from_authors("hit", {"depth": 3})
    with pytest.raises(ValueError, match="pooled"):
        HiTConfig(image_size=24, patch_size=4, blocks=(1, 1, 1), block_dims=(8, 8, 8), num_heads=2)
    model = HiT(CONFIGS["no pool"]).eval()
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(1, 3, 8, 8))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.decompose(torch.zeros(1, 3, 16, 16))


# -- parity with the authors' code (fixture written by scripts/crosscheck_hit_reference.py) ----------------------
def _fixture():
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE / "hit-ref.json").read_text())
    return meta, load_file(str(FIXTURE / "hit-ref.safetensors"))


@pytest.mark.parametrize("tag", ["pool-wide", "pool-layers", "no-pool"])
def test_parity_with_the_authors_model_code(tag):
    meta, tensors = _fixture()
    entry = meta["configs"][tag]
    model = HiT(HiTConfig.from_authors(entry["model"]["name"], entry["model"]["params"])).eval()
    prefix = f"{tag}/state/"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)  # the authors' parameter names, unchanged
    x, ref = tensors[f"{tag}/input"], {k.split("/")[-1]: v for k, v in tensors.items() if k.startswith(f"{tag}/ref/")}
    with torch.no_grad():
        d = model.decompose(x)
        assert (model(x) - ref["logits"]).abs().max() <= 1e-5
        assert (d.logits - ref["logits"]).abs().max() <= 1e-5
        assert (d.patch_map() - ref["cam"]).abs().max() <= 1e-5  # forward_cam, without the head bias
        roll = ref["rollout"] / (model.config.num_layers if model.config.pool else 1)  # theirs sums when pooled
        assert (model.rollout(x) - roll).abs().max() <= 1e-5
        layer_gap = float((d.layer_map() - ref["cam_layer"]).abs().max())
    if entry["exact_layer_map"]:
        assert layer_gap <= 1e-5
    else:  # their spatial forward_cam_layer divides the LayerNorm mean/bias by P, not by the number of terms
        assert layer_gap > 1e-3
        assert (ref["cam_layer_logits"] - ref["logits"]).abs().max() > 1e-3


def test_insertion_deletion_curves_match_the_authors_causal_metrics():
    from cfx_cli.whitebox import TorchModuleClassifier
    from cfx_plugins.metrics.insertion_deletion import causal_curves

    meta, tensors = _fixture()
    entry = meta["configs"]["pool-wide"]
    model = HiT(HiTConfig.from_authors(entry["model"]["name"], entry["model"]["params"])).eval()
    model.load_state_dict({k[len("pool-wide/state/"):]: v for k, v in tensors.items()
                           if k.startswith("pool-wide/state/")})
    clf = TorchModuleClassifier(model, [str(i) for i in range(7)], None, spec="fixture")
    x, cam = tensors["pool-wide/input"], tensors["pool-wide/ref/causal_map"]
    for mode in ("insertion", "deletion"):
        for sub in ("zero", "blur"):  # inputs are already normalised: the "zero" colour is 0
            ours = causal_curves(clf, x, cam, mode=mode, substrate=sub, steps=entry["causal_steps"], fill=(0, 0, 0))
            assert (ours - tensors[f"pool-wide/ref/causal_{mode[:3]}_{sub}"]).abs().max() <= 1e-5, (mode, sub)


def test_blur_kernel_is_the_authors_gkern():
    from scipy.ndimage import gaussian_filter

    from cfx_plugins.metrics.insertion_deletion import gaussian_kernel

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    assert np.abs(gaussian_kernel(11, 5) - gaussian_filter(delta, 5)).max() < 1e-12
    assert abs(gaussian_kernel(11, 5).sum() - 1) < 1e-12


def test_auc_and_normalised_auc():
    from cfx_plugins.metrics.insertion_deletion import auc, nauc

    assert auc([0.0, 1.0]) == pytest.approx(0.5)
    assert auc([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert nauc([0.0, 0.5]) == pytest.approx(0.5)  # 0.25 / 0.5
    assert nauc([0.2, 0.4, 0.2]) == pytest.approx(0.3 / 0.4)


# -- the demo model and the adapter -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_hit():
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    return load_classifier("demo:hit-digits", ClassifierOptions())


@pytest.fixture(scope="module")
def held_out():
    from cfx_cli.demo.data import load_split

    _, _, x_te, y_te = load_split()
    return torch.from_numpy(x_te), y_te


def test_demo_hit_digits_held_out_accuracy_is_that_of_the_model_card(demo_hit, held_out):
    from cfx_plugins.classifiers.hit import DEMO_DIR

    x, y = held_out
    acc = float((demo_hit.predict_proba(x).argmax(1).numpy() == y).mean())
    recorded = json.loads((DEMO_DIR / "metrics.json").read_text())["held_out_accuracy"]
    assert acc >= 0.95
    assert acc == pytest.approx(recorded, abs=1e-4)
    assert f"{100 * recorded:.2f}%" in (DEMO_DIR / "README.md").read_text()
    assert demo_hit.input_size == (16, 16) and "gradients" in demo_hit.capabilities


def test_demo_hit_maps_are_exact_through_the_classifier(demo_hit, held_out):
    from cfx_plugins.classifiers.hit.maps import hit_input, hit_maps

    x = held_out[0][:32]
    hit, inner, logits = hit_input(demo_hit, x)
    assert torch.allclose(inner, (x - 0.5) / 0.5)  # the classifier's own normalisation, captured
    maps = hit_maps(demo_hit, x)
    pred = logits.argmax(1)
    total = maps.sum((1, 2)) + hit.heads.head.bias[pred]
    assert (total - logits[torch.arange(32), pred]).abs().max() < 1e-5


def test_hit_adapter_config_files_and_checkpoints(tmp_path, demo_hit):
    import yaml
    from safetensors.torch import load_file

    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.errors import UsageError
    from cfx_plugins.classifiers.hit import DEMO_CONFIG, DEMO_DIR, DEMO_WEIGHTS

    x = torch.rand(4, 3, 16, 16)
    ref = demo_hit.predict_proba(x)
    config = json.loads((DEMO_DIR / DEMO_CONFIG).read_text())
    # the authors' YAML layout, and their .pth checkpoint layout ({"model": state_dict, ...})
    (tmp_path / "hit-digits.yaml").write_text(yaml.safe_dump(config))
    state = load_file(str(DEMO_DIR / DEMO_WEIGHTS))
    torch.save({"model": state, "epoch": 59}, tmp_path / "checkpoint.pth")
    clf = load_classifier(f"hit:{tmp_path / 'hit-digits.yaml'}@{tmp_path / 'checkpoint.pth'}", ClassifierOptions())
    assert torch.allclose(clf.predict_proba(x), ref, atol=1e-6) and clf.labels == demo_hit.labels
    with pytest.raises(UsageError, match="do not fit HiT config hit-s"):
        load_classifier(f"hit:hit-s@{DEMO_DIR / DEMO_WEIGHTS}", ClassifierOptions())
    with pytest.raises(UsageError, match="expected hit:CONFIG@WEIGHTS"):
        load_classifier("hit:hit-s", ClassifierOptions())
    with pytest.raises(UsageError, match="no such file, and not one of hit-s"):
        load_classifier(f"hit:nope.yaml@{DEMO_DIR / DEMO_WEIGHTS}", ClassifierOptions())
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"name": "hit", "params": {"depth": 2}}}))
    with pytest.raises(UsageError, match="bad.json: unknown HiT parameter 'depth'"):
        load_classifier(f"hit:{tmp_path / 'bad.json'}@{DEMO_DIR / DEMO_WEIGHTS}", ClassifierOptions())
    with pytest.raises(UsageError, match="do not fit .*size mismatch for heads.head"):  # #classes must fit
        load_classifier(f"hit:{DEMO_DIR / DEMO_CONFIG}@{DEMO_DIR / DEMO_WEIGHTS}#classes=5", ClassifierOptions())


def test_hit_plugins_are_registered_like_built_ins():
    from cfx_cli.plugins import get_registry

    reg = get_registry(warn=False)
    assert reg.classifier_adapters["hit"][1] == "classifier_hit"
    assert reg.region_sources["hit"][1] == "regions_hit"
    assert reg.metrics["insertion_deletion"][1] == "metrics_insertion_deletion"


# -- --region hit ---------------------------------------------------------------------------------------------------
def _demo_item(demo_images):
    from cfx_cli.images import decode, discover

    item = discover([str(demo_images)])[0]
    return item, decode(item.path)


def test_region_hit_takes_the_top_patches_or_a_threshold(demo_images, demo_hit):
    from cfx_cli.regions import make_region_source
    from cfx_plugins.classifiers.hit.maps import hit_maps

    item, image = _demo_item(demo_images)
    grid = hit_maps(demo_hit, torch.from_numpy(image.transpose(2, 0, 1))[None].float())[0]  # 8×8
    src = make_region_source("hit", {"region_area": 0.3})
    src.check(demo_hit)
    mask = src.mask_for(item, (16, 16), image=image, classifier=demo_hit)
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0.0, 1.0}
    patches = mask[::2, ::2]  # whole 2×2-pixel patches
    assert (np.kron(patches, np.ones((2, 2))) == mask).all()
    assert patches.sum() == 20  # ⌈0.3 · 64⌉
    assert grid[patches == 1].min() >= grid[patches == 0].max()  # the highest contributions
    mask = make_region_source("hit", {"region_threshold": 0.5}).mask_for(item, (32, 32), image=image,
                                                                         classifier=demo_hit)
    assert ((mask[::4, ::4] == 1) == (grid > 0.5 * grid.max()).numpy()).all()


def test_region_hit_errors(demo_hit):
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.errors import UsageError
    from cfx_cli.regions import make_region_source, split_region_options

    with pytest.raises(UsageError, match="give one"):
        make_region_source("hit", {"region_area": 0.2, "region_threshold": 0.5})
    with pytest.raises(UsageError, match=r"region_threshold=1.0: must be in \[0, 1\)"):
        make_region_source("hit", {"region_threshold": 1.0})
    with pytest.raises(UsageError, match="takes no argument"):
        make_region_source("hit:layer3", {})
    assert split_region_options({"region_threshold": "0.4", "tau": 1})[1] == {"region_threshold": "0.4"}
    cnn = load_classifier("demo:digits", ClassifierOptions())
    with pytest.raises(UsageError, match="needs a HiT classifier"):
        make_region_source("hit:", {}).check(cnn)


def test_grad_cam_reads_transformer_tokens(demo_hit, held_out):
    from cfx_cli import saliency

    x = held_out[0][:4]
    layer = "model.encoder.layers.block_1.encoder_layer_1.ln_1"  # (N, 1 + 16, D): CLS first, then a 4×4 grid
    assert saliency.probe_layer(demo_hit, layer, (16, 16))[1] == (1, 32, 4, 4)
    cam = saliency.grad_cam(demo_hit, layer, x, demo_hit.predict_proba(x).argmax(1))
    assert cam.shape == (4, 16, 16) and float(cam.max()) == pytest.approx(1.0)


def test_hit_maps_beat_their_reverse_on_insertion_and_deletion(demo_hit, held_out):
    from cfx_plugins.classifiers.hit.maps import hit_maps
    from cfx_plugins.metrics.insertion_deletion import causal_curves, fill_colour, nauc

    x = held_out[0][:12]
    maps = hit_maps(demo_hit, x)
    assert fill_colour(demo_hit) == (0.5, 0.5, 0.5)  # (x − 0.5)/0.5 maps grey to zero
    for mode, better in (("insertion", np.greater), ("deletion", np.less)):
        good = causal_curves(demo_hit, x, maps, mode=mode, substrate="zero", steps=16).mean(0)
        bad = causal_curves(demo_hit, x, -maps, mode=mode, substrate="zero", steps=16).mean(0)
        assert better(nauc(good.numpy()), nauc(bad.numpy()))
        full, empty = (good[-1], good[0]) if mode == "insertion" else (good[0], good[-1])
        probs = demo_hit.predict_proba(x)
        assert float(full) == pytest.approx(float(probs.max(1).values.mean()), abs=1e-6)  # the intact image
        assert float(empty) < float(full)


@pytest.mark.slow
def test_cli_rcsb_with_region_hit_keeps_the_outside_pixels(tmp_path, demo_images, cfx):
    # scale 6 (was 3 before issue 18): RCSB's full-image Adam step, as the authors', is ≈ √a of the masked one
    from cfx_cli.images import decode

    out = tmp_path / "run"
    r = cfx("explain", str(demo_images), "--method", "rcsb", "--classifier", "demo:hit-digits", "--region", "hit",
            "--set", "preset=digits", "--set", "scale=6", "--set", "nfe=10", "--limit", "3", "--out", str(out),
            "--device", "cpu", "--set", "region_area=0.3", "--set", "guide=")  # the HiT's own gradients, a = 0.3
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["mask"] == "hit" and info["region_options"] == {"region_area": 0.3}
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and any(rec["status"] == "flipped" for rec in recs)
    for rec in recs:
        orig, cf = decode(out / rec["original"]), decode(out / rec["counterfactual"])
        mask = decode(out / rec["mask"]).mean(axis=2) > 0.5
        assert mask.mean() == pytest.approx(20 / 64)  # 20 whole 2×2 patches of the 8×8 grid
        assert (orig[~mask] == cf[~mask]).all()  # bit-identical outside the HiT region
        assert (orig[mask] != cf[mask]).any()
    r = cfx("eval", str(out), "--metrics", "insertion_deletion", "--set", "insdel_steps=16", "--format", "json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["runs"][0]
    assert row["insdel_n"] == 3 and 0 < row["del_zero"] < row["ins_zero"] <= 1
