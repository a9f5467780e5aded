"""``--model SPEC`` loaders: diffusers folders and hub ids, Stable Diffusion components, I2SB, demo dispatch."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import types

import pytest
import torch
from conftest import fixture_dir, run_cfx
from model_helpers import TINY_ADM_FLAGS, make_sd_folder, tiny_tokenizer_and_encoder, tiny_unet2d

from cfx_cli.errors import UsageError
from cfx_cli.models import load_model, parse_model_spec


def _save_pixel_pipeline(folder, unet, scheduler):
    unet.save_pretrained(str(folder / "unet"))
    scheduler.save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )


def test_spec_parsing(tmp_path):
    assert parse_model_spec("adm:/x/model.pt") == ("adm", "/x/model.pt")
    assert parse_model_spec("diffusers:org/name") == ("diffusers", "org/name")
    for bad in ("model.pt", "foo:bar", "adm:"):
        with pytest.raises(UsageError, match="expected demo:NAME"):
            parse_model_spec(bad)
    # a missing checkpoint is the first thing said, before its missing flags
    for scheme in ("adm", "i2sb"):
        with pytest.raises(UsageError, match=r"^--model \w+:/nonexistent.pt: /nonexistent.pt: no such file$"):
            load_model(f"{scheme}:/nonexistent.pt")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="need --model-flags"):
        load_model(f"adm:{tmp_path / 'model.pt'}")


@pytest.mark.slow  # importing diffusers alone takes ~10 s on a busy 2-core machine
def test_diffusers_pixel_round_trip(tmp_path):
    """save_pretrained → load through the spec → the same outputs; the schedule is the scheduler's."""
    from diffusers import DDPMScheduler

    unet = tiny_unet2d()
    for p in unet.parameters():  # random non-zero weights everywhere
        p.data.normal_(0, 0.05)
    sched = DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2")
    _save_pixel_pipeline(tmp_path / "pipe", unet, sched)
    unet.save_pretrained(str(tmp_path / "bare"))  # a bare UNet2DModel folder (config.json + weights)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 150])
    with torch.no_grad():
        ref = unet(x, t).sample
        for folder in ("pipe", "bare"):
            model = load_model(f"diffusers:{tmp_path / folder}", expect="pixel")
            assert model.kind == "pixel" and model.image_size == 16
            out = model(x, t)
            assert (out - ref).abs().max().item() < 1e-6, folder
    pipe = load_model(f"diffusers:{tmp_path / 'pipe'}")
    assert pipe.diffusion.num_steps == 200
    assert torch.allclose(pipe.diffusion.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6)
    with pytest.raises(UsageError, match="needs a latent model, got a pixel model"):
        load_model(f"diffusers:{tmp_path / 'pipe'}", expect="latent")


def test_learned_variance_unet_is_detected(tmp_path):
    from diffusers import DDPMScheduler

    _save_pixel_pipeline(tmp_path, tiny_unet2d(learned_variance=True), DDPMScheduler(variance_type="learned_range"))
    model = load_model(f"diffusers:{tmp_path}")
    assert model.learn_sigma and model(torch.zeros(1, 3, 16, 16), 3).shape == (1, 6, 16, 16)


def test_stable_diffusion_folder_loads_all_components(tmp_path):
    from safetensors.torch import load_file

    fixture = fixture_dir("time-edict")
    folder = make_sd_folder(fixture, tmp_path / "sd")
    model = load_model(f"diffusers:{folder}", expect="latent")
    assert {"vae", "unet", "text_encoder"} <= set(model.info)
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    tensors = load_file(str(fixture / "tensors.safetensors"))
    with torch.no_grad():
        latent = model.encode_images((tensors["image"] + 1) / 2)  # the fixture's image is in [-1, 1]
        # the fixture's input_latent = vae.encode(image).latent_dist.mean * scaling_factor
        assert (latent - tensors["input_latent"]).abs().max().item() < 1e-4
        emb = model.encode_prompts(["three", "a photo"])
        assert emb.shape == (2, 8, 32)
        with pytest.raises(UsageError, match=r"'a digit three'\) is 13 tokens, longer than the text encoder's 8"):
            model.encode_prompts(["a", "a digit three"])  # never silently truncated
        eps = model.unet_eps(latent, torch.tensor([101, 501]), emb)
        assert eps.shape == latent.shape and torch.isfinite(eps).all()
        assert model.decode_latents(latent).shape == tensors["image"].shape


def test_sd_folder_missing_file_fails_in_one_line(tmp_path):
    folder = make_sd_folder(fixture_dir("time-edict"), tmp_path / "sd")
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "tokenizer" / "merges.txt").unlink()
    (folder / "tokenizer" / "tokenizer.json").unlink()
    res = run_cfx("models", f"diffusers:{folder}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "text_encoder/model.safetensors" in lines[0] and "tokenizer/merges.txt" in lines[0]
    assert str(folder) in lines[0]


def test_uncached_hub_id_offline_fails_in_one_line(tmp_path):
    res = run_cfx(
        "models",
        "diffusers:someorg/not-a-cached-model",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)},
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "someorg/not-a-cached-model" in lines[0] and "not found in the Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]


@pytest.mark.slow  # two CLI subprocesses importing diffusers
def test_cached_hub_id_loads_offline(tmp_path):
    """A hub id present in the HF cache resolves with no network (HF_HUB_OFFLINE=1)."""
    from diffusers import DDPMScheduler

    snap = tmp_path / "hub" / "models--someorg--tiny-ddpm" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    _save_pixel_pipeline(snap, tiny_unet2d(), DDPMScheduler(num_train_timesteps=50))
    (tmp_path / "hub" / "models--someorg--tiny-ddpm" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-ddpm" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    res = run_cfx("models", "diffusers:someorg/tiny-ddpm", "--json", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "pixel" and info["image_size"] == 16 and "50 steps" in info["schedule"]
    listing = run_cfx("models", "--json", env=env)
    cached = json.loads(listing.stdout)["cached"]
    assert [c["hub_id"] for c in cached] == ["someorg/tiny-ddpm"] and cached[0]["size_bytes"] > 0


def _tiny_i2sb_checkpoint(tmp_path):
    from cfx_cli.models.adm import build_unet, load_flags

    torch.manual_seed(0)
    flags = load_flags(TINY_ADM_FLAGS)
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = build_unet(flags)  # I2SB's Image256Net holds the ADM net under this name
    for p in wrapper.parameters():
        p.data.normal_(0, 0.05)
    shadow = [p.detach().clone() + 0.01 * torch.randn_like(p) for p in wrapper.parameters()]
    ckpt = {
        "net": wrapper.state_dict(),
        "ema": {"decay": 0.99, "num_updates": 10, "shadow_params": shadow, "collected_params": None},
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0]}]},
        "sched": None,
    }
    torch.save(ckpt, tmp_path / "latest.pt")
    ref = build_unet(flags)
    with torch.no_grad():
        for p, s in zip(ref.parameters(), shadow, strict=True):
            p.copy_(s)
    return ref.eval()


def test_i2sb_checkpoint_with_json_options_reads_net_unless_use_ema(tmp_path):
    from cfx_cli.models.adm import build_unet, load_flags

    ref = _tiny_i2sb_checkpoint(tmp_path)
    options = {"interval": 100, "beta_max": 0.3, "t0": 1e-4, "T": 1.0, "cond_x1": False, "adm_flags": TINY_ADM_FLAGS}
    (tmp_path / "options.json").write_text(json.dumps(options))
    x = torch.randn(2, 3, 32, 32)
    steps = torch.tensor([10, 99])
    time = torch.linspace(1e-4, 1.0, 100)[steps] * 100  # float32, as I2SB's Runner computes it
    # the default: `net`, as RCSB's code loads the checkpoint
    model = load_model(f"i2sb:{tmp_path / 'latest.pt'}", expect="bridge")
    assert not model.info["ema"] and model.bridge.interval == 100
    net = build_unet(load_flags(TINY_ADM_FLAGS))
    state = torch.load(tmp_path / "latest.pt", weights_only=True)["net"]
    net.load_state_dict({k.removeprefix("diffusion_model."): v for k, v in state.items()})
    with torch.no_grad():
        assert (model(x, steps) - net.eval()(x, time)).abs().max().item() < 1e-5
    # "use_ema": true: the EMA weights, as I2SB's sample.py uses them
    (tmp_path / "options.json").write_text(json.dumps({**options, "use_ema": True}))
    model = load_model(f"i2sb:{tmp_path / 'latest.pt'}", expect="bridge")
    assert model.info["ema"]
    with torch.no_grad():
        out = model(x, steps)
        expected = ref(x, time)
        assert (out - expected).abs().max().item() < 1e-5
        x0 = model.pred_x0(x, steps)
        assert torch.allclose(x0, x - model.bridge.std_fwd[steps].float().view(-1, 1, 1, 1) * out, atol=1e-6)


def test_i2sb_pickled_options_need_trust(tmp_path):
    _tiny_i2sb_checkpoint(tmp_path)
    opt = argparse.Namespace(
        interval=100,
        beta_max=0.3,
        t0=1e-4,
        T=1.0,
        cond_x1=False,
        ot_ode=True,
        corrupt="inpaint-freeform2030",
        image_size=32,
        lr=5e-5,
    )
    (tmp_path / "options.pkl").write_bytes(pickle.dumps(opt))
    flags = " ".join(f"--{k} {v}" for k, v in TINY_ADM_FLAGS.items())
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_model(f"i2sb:{tmp_path / 'latest.pt'}", flags)
    model = load_model(f"i2sb:{tmp_path / 'latest.pt'}", flags, trust_pickle=True)
    assert model.options["corrupt"] == "inpaint-freeform2030" and model.options["interval"] == 100
    with pytest.raises(UsageError, match="no bridge options found"):
        (tmp_path / "options.pkl").unlink()
        load_model(f"i2sb:{tmp_path / 'latest.pt'}", flags)


def test_demo_dispatch_is_tolerant(monkeypatch, tmp_path):
    import cfx_cli.models.demo as demo

    monkeypatch.setattr(demo, "DEMO_MODULE", "cfx_cli.demo.no_such_generators_module")
    with pytest.raises(UsageError, match="demo generators are not installed"):
        load_model("demo:pixel")
    fake = types.ModuleType("cfx_fake_generators")
    fake.GENERATORS = {"pixel": "pixel DDPM on digits"}
    fake.load = lambda name, device="cpu": types.SimpleNamespace(kind="pixel", name=name, device=device)
    monkeypatch.setitem(sys.modules, "cfx_fake_generators", fake)
    monkeypatch.setattr(demo, "DEMO_MODULE", "cfx_fake_generators")
    assert load_model("demo:pixel", expect="pixel").name == "pixel"
    from safetensors.torch import save_file

    from cfx_cli.models.catalog import collect

    (tmp_path / "unet").mkdir()
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    fake.model_dir = lambda name: tmp_path
    [entry] = collect()["demo"]
    assert entry["spec"] == "demo:pixel" and entry["summary"] == "pixel DDPM on digits"
    assert entry["size_bytes"] == (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    with pytest.raises(UsageError, match="unknown demo generator.*demo:pixel"):
        load_model("demo:latent")

    def missing(name, device="cpu"):
        raise FileNotFoundError(2, "No such file", f"{name}.safetensors")

    fake.load = missing
    with pytest.raises(UsageError, match="weights missing"):
        load_model("demo:pixel")


def test_tokens_helper_trains_only_new_rows(tmp_path):
    from cfx_cli.models.tokens import add_tokens, load_tokens, save_tokens, train_only_tokens

    tok, enc = tiny_tokenizer_and_encoder(tmp_path)
    before = enc.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(tok, enc, ["<c3>", "<c8>"], init_word="digit")
    table = enc.get_input_embeddings().weight
    init = before[tok("digit", add_special_tokens=False).input_ids].mean(0)
    assert table.shape[0] == before.shape[0] + 2 and torch.allclose(table[ids[0]], init)
    assert tok("a <c3>", add_special_tokens=False).input_ids[-1] == ids[0]  # the new token is one token
    with pytest.raises(UsageError, match="already in the tokenizer"):
        add_tokens(tok, enc, ["<c3>"])
    weight, handle = train_only_tokens(enc, ids)
    opt = torch.optim.SGD([weight], lr=1.0)
    ids_in = tok(["a <c3> <c8>"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    enc(ids_in)[0].square().mean().backward()
    opt.step()
    moved = [i for i in range(weight.shape[0]) if i < before.shape[0] and not torch.equal(weight[i], before[i])]
    assert moved == [] and not torch.allclose(weight[ids[0]], init)
    assert all(not p.requires_grad for n, p in enc.named_parameters() if "token_embedding" not in n)
    handle.remove()
    save_tokens(tmp_path / "tokens.safetensors", tok, enc, ["<c3>", "<c8>"])
    tok2, enc2 = tiny_tokenizer_and_encoder(tmp_path / "fresh")
    assert load_tokens(tmp_path / "tokens.safetensors", tok2, enc2) == ["<c3>", "<c8>"]
    ids2 = tok2(["a <c3> <c8>"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert torch.equal(ids2, ids_in)
    with torch.no_grad():
        assert torch.allclose(enc2(ids2)[0], enc(ids_in)[0], atol=1e-6)


def test_malformed_model_spec_is_a_usage_error(demo_images, tmp_path):
    res = run_cfx(
        "explain", str(demo_images), "--method", "pgd", "--model", "stable-diffusion", "--out", str(tmp_path / "run")
    )
    assert res.returncode == 2 and "expected demo:NAME" in res.stderr
    assert not (tmp_path / "run").exists()


def test_cfx_models_lists_known_and_demo():
    res = run_cfx("models")
    assert res.returncode == 0, res.stderr
    assert "demo models" in res.stdout and "diffusers:CompVis/stable-diffusion-v1-4" in res.stdout
    data = json.loads(run_cfx("models", "--json").stdout)
    assert {"demo", "known", "cached"} <= set(data)
    assert any(k["spec"].startswith("i2sb:") for k in data["known"])


def test_model_for_context_caches_and_checks_kind(tmp_path):
    from cfx_cli.explainers import ExplainContext
    from cfx_cli.models import clear_model_cache, model_for

    _tiny_i2sb_checkpoint(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"interval": 50, "adm_flags": TINY_ADM_FLAGS}))
    spec = f"i2sb:{tmp_path / 'latest.pt'}"
    ctx = ExplainContext(classifier=None, params={}, model=spec)
    clear_model_cache()
    first = model_for(ctx, "bridge", "rcsb")
    assert model_for(ctx, "bridge") is first and first.bridge.interval == 50 and first.spec == spec
    assert model_for(ctx, "bridge", fresh=True) is not first  # a private copy for a method that changes it
    with pytest.raises(UsageError, match="dime needs a pixel model, got a bridge model .*ADM checkpoint"):
        model_for(ctx, "pixel", "dime")
    clear_model_cache()


def test_i2sb_safetensors_conversion_from_docs(tmp_path):
    """docs/models.md: latest.pt → latest.safetensors (EMA weights) + latest.json loads without any pickle."""
    from safetensors.torch import save_file

    ref = _tiny_i2sb_checkpoint(tmp_path)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    net = {k.removeprefix("diffusion_model."): v for k, v in ckpt["net"].items()}
    ema = dict(zip(net, ckpt["ema"]["shadow_params"], strict=True))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp_path / "latest.safetensors"))
    (tmp_path / "latest.json").write_text(json.dumps({"interval": 100, "adm_flags": TINY_ADM_FLAGS}))
    model = load_model(f"i2sb:{tmp_path / 'latest.safetensors'}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        t = torch.linspace(1e-4, 1.0, 100, dtype=torch.float64)[[42]].float() * 100
        assert (model(x, 42) - ref(x, t)).abs().max().item() < 1e-5


def test_pixel_model_respacing_maps_to_original_times(tmp_path):
    from diffusers import DDPMScheduler

    _save_pixel_pipeline(tmp_path, tiny_unet2d(), DDPMScheduler(num_train_timesteps=100))
    model = load_model(f"diffusers:{tmp_path}").with_respacing("ddim10")
    assert model.diffusion.num_steps == 10 and model.diffusion.model_timesteps(9, batch=1).item() == 90.0
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x, 9), model.net(x, torch.tensor([90])).sample, atol=1e-6)


def _sd_folder_predicting(tmp_path, prediction: str):
    folder = make_sd_folder(fixture_dir("time-edict"), tmp_path / prediction)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), prediction_type=prediction)))
    return folder


def test_v_prediction_unet_eps_is_the_closed_form(tmp_path):
    """SD 2.x 768-v layout: the one latent model gives ε = √ᾱ·v + √(1−ᾱ)·x_t from the UNet's v."""
    model = load_model(f"diffusers:{_sd_folder_predicting(tmp_path, 'v_prediction')}", expect="latent")
    assert model.prediction_type == "v_prediction"
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([301, 17])
    with torch.no_grad():
        emb = model.encode_prompts(["a digit", "a photo"])
        v = model.unet(z, t, encoder_hidden_states=emb).sample.double()
        got = model.unet_eps(z, t, emb)
        assert torch.allclose(model.unet_eps(z[:1], 301, emb[:1]), got[:1], atol=1e-6)  # int timesteps too
    ab = model.scheduler.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    expected = ab.sqrt() * v + (1 - ab).sqrt() * z.double()
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-6)
    assert (got.double() - v).abs().max() > 1e-2  # the conversion is not the identity


def test_x0_prediction_unet_eps_and_unknown_prediction_types(tmp_path):
    model = load_model(f"diffusers:{_sd_folder_predicting(tmp_path, 'sample')}", expect="latent")
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([420])
    with torch.no_grad():
        emb = model.encode_prompts(["a digit"])
        x0 = model.unet(z, t, encoder_hidden_states=emb).sample.double()
        got = model.unet_eps(z, t, emb).double()
    ab = model.scheduler.alphas_cumprod[t].double()
    assert torch.allclose(got, (z.double() - ab.sqrt() * x0) / (1 - ab).sqrt(), atol=1e-5)
    with pytest.raises(UsageError, match="prediction_type 'flow'.*not supported"):
        load_model(f"diffusers:{_sd_folder_predicting(tmp_path, 'flow')}")


def test_eps_from_output_inverts_each_parametrisation():
    """x_t = √ᾱ x_0 + √(1−ᾱ) ε with v = √ᾱ ε − √(1−ᾱ) x_0: ε comes back from ε, v and x_0 alike."""
    from cfx_cli.diffusion import eps_from_output

    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g,
                                                                                    dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64).view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    for pred, out in (("epsilon", eps), ("v_prediction", a * eps - s * x0), ("sample", x0)):
        assert torch.allclose(eps_from_output(out, x_t, a, s, pred), eps, atol=1e-9), pred
    with pytest.raises(ValueError, match="flow"):
        eps_from_output(eps, x_t, a, s, "flow")
