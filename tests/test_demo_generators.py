"""The embedded demo generators: committed weights load, are small, and do what their model cards claim.

The quality bars are issue 5's: ≥ 80% of 200 unconditional pixel-DDPM samples classified by demo:digits with
confidence ≥ 0.9; prompted text-to-image samples classified as the prompted digit ≥ 70% on average over
digits; inpainted 20–30% free-form holes give back the original label ≥ 80%. Fixed seeds, fewer sampler
steps than the model cards (the cards' numbers are measured by the training scripts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cfx_cli.demo import generators as gen

REPO = Path(__file__).resolve().parents[1]
DEMO_BUDGET_BYTES = 25_000_000


def _files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file()]


def test_demo_weights_are_safetensors_and_within_budget():
    total = 0
    for name, folder in gen.DIRS.items():
        files = _files(folder)
        weights = [f for f in files if f.suffix == ".safetensors"]
        assert weights, f"demo:{name}: no safetensors weights in {folder}"
        assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")], folder
        total += sum(f.stat().st_size for f in weights)
    assert total <= DEMO_BUDGET_BYTES, f"demo weights are {total / 1e6:.1f} MB (budget 25 MB)"


@pytest.mark.parametrize("name", sorted(gen.GENERATORS))
def test_model_cards_carry_figures_and_measured_numbers(name):
    folder = gen.DIRS[name]
    card = (folder / "README.md").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    for png in ("loss_curve.png", "samples.png"):
        assert f"({png})" in card
        from PIL import Image

        with Image.open(folder / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    headline = {"pixel": lambda m: m["ddim50"]["confident_fraction"],
                "latent": lambda m: m["eval"]["mean_accuracy"],
                "bridge": lambda m: m["eval"]["label_recovered"]}[name](metrics)
    assert f"{headline:.1%}" in card, f"{name}: the card does not state its measured {headline:.1%}"


def test_demo_dispatch_returns_models_of_the_right_kind():
    from cfx_cli.models import BridgeModel, LatentModel, PixelModel, demo_models, load_model

    assert set(demo_models()) == {"pixel", "latent", "bridge"}
    for name, cls in (("pixel", PixelModel), ("latent", LatentModel), ("bridge", BridgeModel)):
        model = load_model(f"demo:{name}", expect=name)
        assert model.kind == name and type(model) is cls and model.spec == f"demo:{name}"


def test_unknown_demo_generator_names_the_available_ones():
    from cfx_cli.errors import UsageError
    from cfx_cli.models.spec import load_model

    with pytest.raises(UsageError, match="demo:pixel"):
        load_model("demo:nope")


def test_tokenizer_is_word_level_and_accepts_new_tokens():
    model = gen.load("latent")
    tok = model.tokenizer
    for word in ("a", "handwritten", "digit", *gen.DIGIT_WORDS):
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    ids = model.tokenize([gen.caption(3)])
    assert ids.shape == (1, tok.model_max_length) == (1, model.text_encoder.config.max_position_embeddings)
    before = len(tok)
    assert tok.add_tokens(["<digit-3>"]) == 1
    assert len(tok) == before + 1
    assert tok.convert_tokens_to_ids("<digit-3>") == before
    assert len(tok("a handwritten <digit-3>").input_ids) == 5


def test_vae_reconstructs_held_out_digits():
    from cfx_cli.demo.data import load_split

    model = gen.load("latent")
    _, _, x_te, y_te = load_split()
    x = torch.from_numpy(x_te[:100])
    with torch.no_grad():
        z = model.vae.encode(x * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
        assert z.shape == (100, 4, 8, 8)
        rec = model.decode_latents(z)
    assert (rec - x).pow(2).mean().item() < 0.01
    assert (gen.classify(rec)[0] == torch.from_numpy(y_te[:100])).float().mean().item() >= 0.95


def test_freeform_masks_cover_the_requested_area():
    m = gen.freeform_masks(64, area=(0.2, 0.3), seed=5)
    assert m.shape == (64, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    area = m.mean(dim=(1, 2, 3))
    assert area.min().item() >= 0.2 - 1e-6 and area.max().item() <= 0.3 + 1e-6
    assert torch.equal(m, gen.freeform_masks(64, area=(0.2, 0.3), seed=5))


def test_bridge_network_output_gives_tweedie_x0():
    model = gen.load_bridge()
    x = torch.randn(2, 3, 16, 16)
    steps = torch.tensor([10, 900])
    with torch.no_grad():
        out = model(x, steps)
        x0 = model.pred_x0(x, steps)
    assert torch.allclose(x0, x - model.bridge.std_fwd[steps].float().view(-1, 1, 1, 1) * out, atol=1e-6)


def test_training_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import _demo_training as dt

    monkeypatch.setattr(dt, "CKPT_ROOT", tmp_path)

    def run(name: str, crash_at: int | None = None) -> list[float]:
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1)
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        ema = dt.EMA(net, 0.9)

        def step_fn(step: int) -> float:
            if step == crash_at:
                raise KeyboardInterrupt
            g = dt.step_generator(0, step)
            x = torch.randn(8, 4, generator=g)
            loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        return dt.train_loop(name, 8, step_fn, net, ema, opt, ckpt_every=3, log_every=100)

    straight = run("straight")
    with pytest.raises(KeyboardInterrupt):
        run("killed", crash_at=7)  # dies after the checkpoint at step 6
    assert run("killed") == straight


# ---------------------------------------------------------------- the quality bars
@pytest.mark.slow
def test_pixel_ddpm_samples_are_confident_digits():
    model = gen.load("pixel")
    imgs = gen.sample_pixel_ddpm(model, 200, steps=20, seed=0)
    assert imgs.shape == (200, 3, 16, 16)
    label, conf = gen.classify(imgs)
    assert (conf >= 0.9).float().mean().item() >= 0.8
    assert len(label[conf >= 0.9].unique()) == 10  # every digit appears, not one mode


@pytest.mark.slow
def test_latent_t2i_draws_the_prompted_digit():
    model = gen.load("latent")
    per = 10
    prompts = [gen.caption(d) for d in range(10) for _ in range(per)]
    imgs = gen.sample_latent_t2i(model, prompts, steps=20, guidance=3.0, seed=0)
    pred, _ = gen.classify(imgs)
    target = torch.arange(10).repeat_interleave(per)
    per_digit = torch.stack([(pred[target == d] == d).float().mean() for d in range(10)])
    assert per_digit.mean().item() >= 0.7, per_digit.tolist()


@pytest.mark.slow
def test_bridge_inpainting_recovers_the_label():
    from cfx_cli.demo.data import load_split

    model = gen.load_bridge()
    _, _, x_te, y_te = load_split()
    x, y = torch.from_numpy(x_te[:200]), torch.from_numpy(y_te[:200])
    masks = gen.freeform_masks(200, seed=1)
    out = gen.inpaint(model, x, masks, nfe=10, seed=0)
    assert (out - x).mul(1 - masks).abs().max().item() < 1e-5  # known pixels are kept
    recovered = (gen.classify(out)[0] == y).float().mean().item()
    assert recovered >= 0.8
    # and the bridge does the work: better than classifying the noise-filled input
    g = torch.Generator().manual_seed(0)
    x1 = (gen.corrupt_for_inpainting(x * 2 - 1, masks, g) / 2 + 0.5).clamp(0, 1)
    assert recovered > (gen.classify(x1)[0] == y).float().mean().item()
