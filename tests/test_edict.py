"""EDICT (exact and legacy pairing) and TIME's negative guidance against the reference fixture."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fixture_dir

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
torch.set_num_threads(1)  # two shared cores: one thread avoids oversubscription


def _load(name: str = "time-edict"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    root = fixture_dir(name)
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    sched = DDIMScheduler.from_pretrained(root / "scheduler")
    tensors = load_file(str(root / "tensors.safetensors"))
    exact = load_file(str(root / "exact.safetensors"))
    cases = json.loads((root / "cases.json").read_text())
    return unet, vae, sched, tensors, exact, cases


@pytest.fixture(scope="module")
def fx():
    return _load()


def _run_case(fx, case, mode):
    from cfx_cli.diffusion.edict import edict_denoise, edict_invert, edict_timesteps
    from cfx_cli.diffusion.guidance import guided_eps_fn

    unet, vae, sched, t, _, _ = fx
    cfg = sched.config
    steps = case["total_steps"]
    ts = edict_timesteps(steps, cfg.num_train_timesteps, cfg.steps_offset)[: case["inversion_steps"]]
    ratio = cfg.num_train_timesteps // steps
    ab, final = sched.alphas_cumprod, float(sched.final_alpha_cumprod)
    # guidance_scale is g itself: the authors' --guidance-scale, i.e. a TIME schedule's W under the default
    # guidance=w (the fixture README's "g = 1 + w" is cfx's old reading of W, still --set guidance=1+w)
    g, p = case["guidance_scale"], case["mixing_p"]

    def unet_eps(z, step, embeds):
        return unet(z, step, encoder_hidden_states=embeds).sample

    src, tgt = t["source_embeds"], t["target_embeds"]
    with torch.no_grad():
        z0 = t["input_latent"]
        inv_eps = guided_eps_fn(unet_eps, src, tgt, g)
        xi, yi = edict_invert(z0.clone(), z0.clone(), inv_eps, ts, ratio, ab, final, p, mode=mode)
        xc, _ = edict_denoise(xi, yi, guided_eps_fn(unet_eps, tgt, src, g), ts, ratio, ab, final, p)
        xr, _ = edict_denoise(xi, yi, guided_eps_fn(unet_eps, src, tgt, g), ts, ratio, ab, final, p)
        cf = vae.decode(xc / vae.config.scaling_factor).sample
    return xi, yi, cf, xr


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_fixture_cases_present(fx):
    cases = fx[5]
    assert cases, "cases.json lists no case"
    for case in cases:
        for key in ("inversion_steps", "total_steps", "guidance_scale", "mixing_p"):
            assert key in case


@pytest.mark.slow
def test_exact_mode_matches_reference_and_is_invertible(fx):
    _, _, _, t, exact, cases = fx
    for case in cases:
        k = case["name"]
        xi, yi, cf, xr = _run_case(fx, case, "exact")
        assert _maxdiff(xi, exact[f"{k}_exact_inverted_x"]) <= 1e-3, k
        assert _maxdiff(yi, exact[f"{k}_exact_inverted_y"]) <= 1e-3, k
        assert _maxdiff(cf, exact[f"{k}_exact_counterfactual"]) <= 1e-3, k
        assert _maxdiff(xr, exact[f"{k}_exact_reconstructed_latent"]) <= 1e-3, k
        # denoising with the inversion's prompt roles comes back to the input latent
        assert _maxdiff(xr, t["input_latent"]) <= 1e-3, k
        # ... and a counterfactual is not a reconstruction (the guidance really changes something)
        assert _maxdiff(cf, t["decoded_input"]) > 1e-2, k


@pytest.mark.slow
def test_legacy_mode_matches_published_outputs(fx):
    _, _, _, t, _, cases = fx
    for case in cases:
        k = case["name"]
        xi, yi, cf, xr = _run_case(fx, case, "legacy")
        assert _maxdiff(xi, t[f"{k}_inverted_x"]) <= 1e-3, k
        assert _maxdiff(yi, t[f"{k}_inverted_y"]) <= 1e-3, k
        assert _maxdiff(cf, t[f"{k}_counterfactual"]) <= 1e-3, k
        ref = t[f"{k}_reconstruction"]
        with torch.no_grad():
            rec = xr if ref.shape == xr.shape else fx[1].decode(xr / fx[1].config.scaling_factor).sample
        assert _maxdiff(rec, ref) <= 1e-3, k
        # the published pairing is not exactly invertible
        assert _maxdiff(xr, t["input_latent"]) > 1e-3, k


def test_fixture_guidance_is_a_schedule_value_under_both_conventions(fx):
    from cfx_plugins.explainers.time.generate import guidance_scale

    for case in fx[5]:
        g = case["guidance_scale"]
        assert guidance_scale(g, "w") == g and guidance_scale(g - 1, "1+w") == g


def test_timesteps_and_modes():
    from cfx_cli.diffusion.edict import edict_timesteps, step_levels

    assert edict_timesteps(10) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert edict_timesteps(50)[:3] == [1, 21, 41]
    ab = torch.linspace(0.99, 0.01, 1000)
    assert step_levels(101, 100, ab, 0.5, inverse=True, mode="exact") == (float(ab[1]), float(ab[101]))
    assert step_levels(101, 100, ab, 0.5, inverse=True, mode="legacy") == (float(ab[101]), float(ab[201]))
    assert step_levels(1, 100, ab, 0.5, inverse=False, mode="legacy") == (0.5, float(ab[1]))
    # legacy at τ = T: above the last training step the code's DDIMInverseScheduler ends at ᾱ = 0 …
    assert step_levels(901, 100, ab, 0.5, inverse=True, mode="legacy") == (float(ab[901]), 0.0)
    # … where the inverse step returns the noise prediction: z_t = 0·z + 1·ε
    from cfx_cli.diffusion.edict import edict_coefficients, edict_inverse_coefficients

    assert edict_inverse_coefficients(0.3, 0.0) == (0.0, 1.0)
    a, b = edict_coefficients(0.7, 0.2)
    c, d = edict_inverse_coefficients(0.7, 0.2)
    assert c == pytest.approx(1 / a) and d == pytest.approx(-b / a)
    with pytest.raises(ValueError):
        step_levels(1, 100, ab, 0.5, inverse=True, mode="nope")
