"""DiME and ACE: NFE accounting, batching independence, region masks, ACE's mask/refinement/checkpointing, the
perceptual network option, presets, and end-to-end runs through the CLI (tiny random priors, ADM fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_dir, run_cfx
from model_helpers import tiny_unet2d

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CI box has 2 shared cores: oversubscribed threads crawl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> str:
    """A random 16×16 UNet2DModel with learned variance (6 output channels) and a 1000-step linear schedule."""
    from diffusers import DDPMScheduler

    folder = tmp_path_factory.mktemp("tiny-prior")
    tiny_unet2d(seed=3, learned_variance=True).save_pretrained(str(folder / "unet"))
    DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range").save_pretrained(str(folder / "scheduler"))
    return f"diffusers:{folder}"


@pytest.fixture(scope="module")
def classifier():
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    return load_classifier("demo:digits", ClassifierOptions())


def make_explainer(method: str, model: str, classifier, **overrides):
    from cfx_cli.explainers import ExplainContext
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    cls = get_explainer_class(method)
    params = resolve_params(method, cls.params, cls.presets, {k: str(v) for k, v in overrides.items()})
    return cls(ExplainContext(classifier=classifier, params=params, model=model))


def demo_batch(n: int = 3, seeds: list[int] | None = None, masks=None):
    from cfx_cli.demo import IMAGES_DIR
    from cfx_cli.explainers import ExplainBatch
    from cfx_cli.images import decode

    paths = sorted(IMAGES_DIR.glob("*.png"))[:n]
    images = torch.from_numpy(np.stack([decode(p) for p in paths])).permute(0, 3, 1, 2).float().contiguous()
    targets = torch.tensor([(int(p.stem[-1]) + 3) % 10 for p in paths])
    return ExplainBatch(ids=[p.stem for p in paths], images=images, targets=targets,
                        sources=torch.tensor([int(p.stem[-1]) for p in paths]),
                        seeds=seeds or [11 * (i + 1) for i in range(n)], masks=masks)


def count_calls(explainer):
    """Wrap the prior so every network evaluation is counted per image."""
    counter = {"images": 0}
    model = explainer.model
    original = type(model).__call__

    class Counting(type(model)):
        def __call__(self, x, t, y=None):
            counter["images"] += x.shape[0]
            return original(self, x, t, y)

    model.__class__ = Counting
    return counter


# -- DiME ----------------------------------------------------------------------------------------------------
def test_dime_nfe_matches_tau_formula_per_attempt(tiny_prior, classifier):
    tau = 4
    exp = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=tau, scales="0,0,0", perceptual="l2")
    counter = count_calls(exp)
    calls_before = classifier.calls
    outs = exp.explain(demo_batch(3))
    per_attempt = tau + tau * (tau + 1) // 2
    attempts = [out.params["attempt"] for out in outs]
    for out, k in zip(outs, attempts, strict=True):
        assert out.nfe == k * per_attempt
        assert out.params["nfe_model"] == k * tau * (tau + 1) // 2
        assert out.params["nfe_classifier"] == k * tau
    # the formula is what actually ran: prior calls per image, classifier gradients + one flip check per attempt
    assert counter["images"] == sum(attempts) * tau * (tau + 1) // 2
    assert classifier.calls - calls_before == sum(attempts) * (tau + 1)


def test_dime_retries_only_unflipped_images(tiny_prior, classifier):
    scales = (0.0, 50.0, 400.0)
    # flip_check=png: the retry is decided on the 8-bit image, the one this test re-classifies
    exp = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=3, scales=",".join(map(str, scales)),
                         perceptual="l2", flip_check="png")
    batch = demo_batch(3)
    outs = exp.explain(batch)
    with torch.no_grad():
        cfs = torch.round(torch.stack([o.counterfactual for o in outs]) * 255) / 255
        preds = classifier.logits(cfs).argmax(1)
    for out, pred, tgt in zip(outs, preds, batch.targets, strict=True):
        assert out.params["scale"] == scales[out.params["attempt"] - 1]
        if out.params["attempt"] < len(scales):  # stopped early only because that attempt flipped it
            assert int(pred) == int(tgt)
    assert any(o.params["attempt"] > 1 for o in outs)  # λ_c = 0 flips nothing: retries happened


def test_dime_results_do_not_depend_on_batching(tiny_prior, classifier):
    exp = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=3, scales="5", perceptual="l2")
    together = exp.explain(demo_batch(3))
    full = demo_batch(3)
    for i in range(3):
        from cfx_cli.explainers import ExplainBatch

        single = ExplainBatch(ids=full.ids[i:i + 1], images=full.images[i:i + 1], targets=full.targets[i:i + 1],
                              sources=full.sources[i:i + 1], seeds=full.seeds[i:i + 1])
        alone = exp.explain(single)[0]
        assert torch.allclose(alone.counterfactual, together[i].counterfactual, atol=2e-4)


def test_dime_region_mask_keeps_outside_pixels(tiny_prior, classifier):
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    batch = demo_batch(2, masks=masks)
    exp = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=3, scales="30", perceptual="l2")
    outs = exp.explain(batch)
    for out, img, m in zip(outs, batch.images, masks, strict=True):
        outside = (m[0] == 0)
        assert (out.counterfactual - img).abs()[:, outside].max() <= 1 / 255
        assert (out.counterfactual - img).abs()[:, ~outside].max() > 0  # it did edit inside the region


def test_dime_vgg19_perceptual_from_user_weights(tmp_path, tiny_prior, classifier):
    from safetensors.torch import save_file

    from cfx_plugins.explainers.dime import build_vgg19_features

    torch.manual_seed(0)
    net = build_vgg19_features(18)
    save_file({f"features.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    exp = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=2, scales="5", perceptual="vgg19",
                         perc_weights=str(tmp_path / "vgg.safetensors"))
    out = exp.explain(demo_batch(1))[0]
    assert out.params["perceptual"].startswith("vgg19 features[:18]")
    assert torch.isfinite(out.counterfactual).all()


def test_dime_vgg19_without_weights_is_a_usage_error(tiny_prior, classifier, tmp_path):
    from cfx_cli.errors import UsageError

    with pytest.raises(UsageError, match="perc_weights"):
        make_explainer("dime", tiny_prior, classifier, preset="celeba")
    # the default is the paper's VGG19 term too: no silent pixel MSE, one line naming the ways out
    with pytest.raises(UsageError, match=r"lambda_p=30\) uses the paper's VGG19 .*perc_weights=PATH.*perceptual=l2"):
        make_explainer("dime", tiny_prior, classifier, respacing="20", tau=2)
    assert make_explainer("dime", tiny_prior, classifier, respacing="20", tau=2, lambda_p=0).perceptual_name == "none"
    chosen = make_explainer("dime", tiny_prior, classifier, respacing="20", tau=2, scales="5", perceptual="l2")
    assert chosen.explain(demo_batch(1))[0].params["perceptual"] == "l2 (pixel MSE, not the paper's VGG19)"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(UsageError, match=r"partial.pth: missing VGG19 weight features.0.bias"):
        make_explainer("dime", tiny_prior, classifier, perceptual="vgg19", perc_weights=str(tmp_path / "partial.pth"))


def test_dime_tau_beyond_schedule_is_a_usage_error(tiny_prior, classifier):
    from cfx_cli.errors import UsageError

    # z_τ is noised to index τ (the authors' q_sample(x, start_step)): τ ≤ steps − 1; τ ≤ steps at level τ−1
    with pytest.raises(UsageError, match="exceeds the 10 steps.*τ ≤ 9"):
        make_explainer("dime", tiny_prior, classifier, respacing="10", tau=10, lambda_p=0)
    make_explainer("dime", tiny_prior, classifier, respacing="10", tau=10, lambda_p=0, z_tau_level="tau-1")


# -- ACE -----------------------------------------------------------------------------------------------------
def test_ace_mask_is_dilated_normalised_difference(tiny_prior, classifier):
    exp = make_explainer("ace", tiny_prior, classifier, dilation=5, threshold=0.15)
    x = torch.zeros(1, 3, 16, 16)
    pe = x.clone()
    pe[0, :, 8, 8] = 0.5  # the peak → normalised to 1, dilated to a 5×5 square
    pe[0, 0, 2, 2] = 0.05  # 0.05 / 1.5 of the peak: below the threshold, not in the mask
    normalised, dilated, mask = exp.masks(x, pe)
    assert mask.shape == (1, 1, 16, 16)
    assert float(normalised.max()) == 1.0 and torch.equal(dilated >= 0.15, mask.bool())
    assert int(mask.sum()) == 25 and mask[0, 0, 6:11, 6:11].all()
    region = torch.zeros(1, 1, 16, 16)
    region[..., 8:, :] = 1
    assert int(exp.masks(x, pe, region)[2].sum()) == 15  # intersected with --mask


def test_ace_checkpointing_gives_the_same_gradient(tiny_prior, classifier):
    from cfx_cli.diffusion.noise import SeededNoise

    batch = demo_batch(2)
    grads = []
    for ckpt in (False, True):
        exp = make_explainer("ace", tiny_prior, classifier, respacing="20", tau=3, checkpoint=ckpt)
        noise = SeededNoise().for_batch(["a", "b"], [1, 2], "cpu")
        draws = exp._draw(noise, [0, 1], (3, 16, 16), exp.filter_keys(0))
        grads.append(exp.class_gradient(batch.images, batch.targets, draws))
    assert grads[0].abs().max() > 0  # gradients do flow through the whole chain
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_ace_region_and_outputs(tiny_prior, classifier):
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, :, 8:] = 1
    batch = demo_batch(2, masks=masks)
    exp = make_explainer("ace", tiny_prior, classifier, respacing="20", tau=2, iterations=3, step=8 / 255,
                         threshold=0.0)
    outs = exp.explain(batch)
    for out, img, m in zip(outs, batch.images, masks, strict=True):
        outside = (m[0] == 0)
        assert torch.equal(out.counterfactual[:, outside], img[:, outside])  # exactly the input
        assert out.mask is not None and torch.equal(out.mask, m)  # threshold 0: all of the region
        pe = out.extras["pre_explanations"]
        assert pe.shape == img.shape and torch.equal(pe[:, outside], img[:, outside])  # attack stays in M
        assert out.nfe == 3 * 2 + 2 + 3


def test_ace_results_do_not_depend_on_batching(tiny_prior, classifier):
    from cfx_cli.explainers import ExplainBatch

    exp = make_explainer("ace", tiny_prior, classifier, respacing="20", tau=2, iterations=2, attack="cw")
    full = demo_batch(3)
    together = exp.explain(full)
    for i in (0, 2):
        single = ExplainBatch(ids=full.ids[i:i + 1], images=full.images[i:i + 1], targets=full.targets[i:i + 1],
                              sources=full.sources[i:i + 1], seeds=full.seeds[i:i + 1])
        alone = exp.explain(single)[0]
        assert torch.allclose(alone.counterfactual, together[i].counterfactual, atol=2e-4)
        assert torch.allclose(alone.extras["pre_explanations"], together[i].extras["pre_explanations"], atol=2e-4)


@pytest.mark.parametrize("attack", ["gd", "pgd"])
def test_ace_l2_distance_has_finite_gradient_at_the_input(tiny_prior, classifier, attack):
    exp = make_explainer("ace", tiny_prior, classifier, respacing="20", tau=2, iterations=2, attack=attack,
                         distance="l2", lambda_d=0.1, step=0.5 if attack == "gd" else 4 / 255)
    out = exp.explain(demo_batch(1))[0]
    pe = out.extras["pre_explanations"]
    assert torch.isfinite(pe).all() and torch.isfinite(out.counterfactual).all()
    assert (pe - demo_batch(1).images[0]).abs().max() > 0  # the attack moved the image


def test_ace_class_weight_reproduces_the_authors_batch_mean(tiny_prior, classifier):
    """cfx sums each image's class loss (batch-independent); class_weight = 1/B gives the authors'
    CrossEntropyLoss() mean over a batch of B, and the celeba preset is 1/3 (celeba-attack.sh: --batch_size 3)."""
    import torch.nn.functional as F

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 4, 7])
    exp = make_explainer("ace", tiny_prior, classifier, preset="celeba")
    assert exp.params["class_weight"] == pytest.approx(1 / 3)
    assert torch.allclose(exp.class_loss(logits, targets), F.cross_entropy(logits, targets))
    summed = make_explainer("ace", tiny_prior, classifier).class_loss(logits, targets)
    assert torch.allclose(summed, F.cross_entropy(logits, targets, reduction="sum"))
    # each image's term is its own: dropping an image leaves the others' losses unchanged
    one = make_explainer("ace", tiny_prior, classifier).class_loss(logits[:1], targets[:1])
    assert torch.allclose(one, F.cross_entropy(logits[:1], targets[:1], reduction="sum"))


def test_ace_two_class_loss_is_the_authors_bce_on_one_logit(tiny_prior, classifier):
    """The published CelebA/BDD classifiers give one logit l and the authors' loss is BCEWithLogits(l, y'); any
    2-class wrapper (0, l) or (−l/2, l/2) gives cfx the same loss and gradient."""
    import torch.nn.functional as F

    exp = make_explainer("ace", tiny_prior, classifier)
    logit = torch.tensor([-1.3, 0.4, 2.0], requires_grad=True)
    targets = torch.tensor([1, 0, 1])
    (g_ref,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logit, targets.float(), reduction="sum"),
                                   logit)
    for wrap in (lambda v: torch.stack([torch.zeros_like(v), v], 1), lambda v: torch.stack([-v / 2, v / 2], 1)):
        loss = exp.class_loss(wrap(logit), targets)
        (g,) = torch.autograd.grad(loss, logit)
        assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, targets.float(), reduction="sum"))
        assert torch.allclose(g, g_ref)


def test_ace_tau_is_the_truncated_time_fraction(tiny_prior, classifier):
    from cfx_cli.errors import UsageError

    # the authors' int(sampling_time_fraction · respaced steps): 0.29 · 100 = 28.999999999999996 → 28
    assert make_explainer("ace", tiny_prior, classifier, respacing="100", time_fraction=0.29).tau == 28
    assert make_explainer("ace", tiny_prior, classifier, preset="celebahq").tau == 5  # 0.2 of 25
    assert make_explainer("ace", tiny_prior, classifier, respacing="100", tau=7).tau == 7  # explicit τ wins
    with pytest.raises(UsageError, match="time_fraction"):
        make_explainer("ace", tiny_prior, classifier, respacing="20", time_fraction=0.01)


def test_ace_cw_returns_the_last_evaluated_iterate(tiny_prior, classifier):
    """The authors' CW.attack returns x' from before its last update (one iteration: the input itself);
    cw_final_update returns the updated one (cfx's earlier behaviour)."""
    batch = demo_batch(1)
    base = {"respacing": "20", "tau": 2, "iterations": 1, "attack": "cw", "step": 5.0, "threshold": 0.0}
    pe = make_explainer("ace", tiny_prior, classifier, **base).explain(batch)[0].extras["pre_explanations"]
    assert (pe - batch.images[0]).abs().max() <= 2e-5  # (tanh(atanh(2x/(1+c) − 1)) + 1)(½ + c) ≈ x
    moved = make_explainer("ace", tiny_prior, classifier, **base, cw_final_update=True).explain(batch)[0]
    assert (moved.extras["pre_explanations"] - batch.images[0]).abs().max() > 1e-3


# -- CLI -----------------------------------------------------------------------------------------------------
def test_methods_document_presets():
    for method, presets in (("dime", ("celeba", "celebahq", "bdd", "digits")),
                            ("ace", ("celeba", "celebahq", "bdd", "imagenet", "digits"))):
        res = run_cfx("methods", method)
        assert res.returncode == 0, res.stderr
        for name in presets:
            assert f"  {name} " in res.stdout
        assert "tau" in res.stdout and "respacing" in res.stdout


def _png(path: Path) -> np.ndarray:
    from cfx_cli.images import decode

    return decode(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dime", "ace"])
def test_cli_region_mask_and_files(tmp_path, tiny_prior, demo_images, method):
    from PIL import Image

    mask = np.zeros((16, 16), np.uint8)
    mask[3:13, 2:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    small = ["--set", "respacing=20", "--set", "tau=2"] + (
        ["--set", "iterations=3", "--set", "threshold=0"] if method == "ace" else ["--set", "scales=20"])
    res = run_cfx("explain", str(demo_images), "--method", method, "--model", tiny_prior, "--limit", "2",
                  "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "run"), *small, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    outside = mask == 0
    for rec in recs:
        orig = _png(tmp_path / "run" / rec["original"])
        cf = _png(tmp_path / "run" / rec["counterfactual"])
        diff = np.abs(cf - orig)[outside]
        assert (diff == 0).all() if method == "ace" else diff.max() <= 1 / 255 + 1e-6
        assert rec["mask"] and (tmp_path / "run" / rec["mask"]).is_file()
        assert rec["nfe"] == (3 * 2 + 2 + 3 if method == "ace" else 2 + 3)
    if method == "ace":
        assert len(list((tmp_path / "run" / "pre_explanations").glob("*.png"))) == 2


ADM_FLAGS = {  # the way the authors' scripts pass MODEL_FLAGS, for the fixture networks' shapes
    "heads": "--attention_resolutions 16,8 --class_cond False --diffusion_steps 1000 --image_size 32 "
             "--learn_sigma True --noise_schedule linear --num_channels 32 --num_heads 4 --num_res_blocks 2 "
             "--resblock_updown True --use_fp16 False --use_scale_shift_norm True --channel_mult 1,2,2",
    "plain": "--attention_resolutions 16 --class_cond False --diffusion_steps 1000 --image_size 32 "
             "--learn_sigma False --noise_schedule linear --num_channels 32 --num_heads 2 --num_res_blocks 1 "
             "--resblock_updown False --use_fp16 False --use_scale_shift_norm False --channel_mult 1,2",
}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "config"), [("dime", "heads"), ("ace", "plain")])
def test_cli_runs_on_adm_fixture_checkpoints(tmp_path, demo_images, method, config):
    fixture = fixture_dir("adm-unet")
    if method == "dime":  # DiME's README: MODEL_FLAGS plus SAMPLE_FLAGS="--batch_size 50 --timestep_respacing 200"
        flags = ADM_FLAGS[config] + " --batch_size 50 --timestep_respacing 50"
        extra = ["--set", "respacing=", "--set", "tau=2", "--set", "scales=10"]
    else:  # ACE's scripts: MODEL_FLAGS, with --timestep_respacing as a separate option (here --set respacing)
        flags = ADM_FLAGS[config]
        extra = ["--set", "respacing=50", "--set", "tau=2", "--set", "iterations=2"]
    res = run_cfx("explain", str(demo_images), "--method", method, "--model", f"adm:{fixture / f'{config}.pt'}",
                  "--model-flags", flags, *extra, "--limit", "2", "--out", str(tmp_path / "run"), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] in ("flipped", "not_flipped") for r in recs] == [True, True]
    for rec in recs:
        assert rec["params"]["schedule"].startswith("50 of 1000 steps")
        cf = _png(tmp_path / "run" / rec["counterfactual"])
        # at the 32×32 prior's own size (issue 18); the 16×16 demo classifier resizes what it is given
        assert cf.shape == (32, 32, 3) and rec["size"] == [32, 32] and rec["source_size"] == [16, 16]


# -- the bar on the embedded demo ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dime", "ace"])
def test_demo_flip_rate_and_closeness(tmp_path, method):
    """On the 16 demo digits with the demo classifier and pixel DDPM (digits preset): ≥ 90% flipped, and the
    flipped counterfactuals are closer to their inputs (mean ℓ1) than the nearest training digit of the target."""
    import importlib.util

    from cfx_cli.demo.data import load_split
    from cfx_cli.errors import UsageError
    from cfx_cli.models import DEFAULT_MODELS

    try:
        from cfx_cli.models import load_model

        load_model(DEFAULT_MODELS["pixel"])
    except UsageError as exc:
        pytest.skip(f"the demo pixel DDPM is not in this build: {exc}")
    spec = importlib.util.spec_from_file_location("bench_dime_ace", Path(__file__).parents[1] / "bench" /
                                                  "dime_ace_digits.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x_train, y_train, _, _ = load_split()
    result = bench.summarise(bench.run(method, tmp_path / method, None, {}, None, 16), x_train, y_train)
    assert result["n"] == 16 and result["errors"] == 0
    assert result["flip_rate"] >= 0.9, result
    assert result["l1_flipped"] < result["ref_flipped"], result
