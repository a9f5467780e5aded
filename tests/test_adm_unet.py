"""ADM / guided-diffusion UNet: parity with the reference fixtures, flag parsing, checkpoint safety."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_dir

from cfx_cli.errors import UsageError
from cfx_cli.models.adm import ADMFlags, build_unet, load_adm, load_flags, parse_flag_string


def _configs():
    path = fixture_dir("adm-unet")
    return path, json.loads((path / "configs.json").read_text())


@pytest.mark.slow  # ~3 s on an idle CPU, ~25 s on the shared 2-core machine
def test_fixture_parity_every_config():
    from safetensors.torch import load_file

    path, configs = _configs()
    assert configs, "configs.json lists no configs"
    for name, cfg in configs.items():
        model = load_adm(path / f"{name}.pt", cfg["flags"], device="cpu")
        assert model.info["parameters"] == cfg["params"], name
        io = load_file(str(path / f"{name}_io.safetensors"))
        with torch.no_grad():
            out = model.net(io["x"], io["t"])
        assert list(out.shape) == cfg["out_shape"], name
        diff = (out - io["output"]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs diff {diff:.2e}"
        # the SDPA attention backend computes the same function
        model.net.set_attention_backend("sdpa")
        with torch.no_grad():
            diff_sdpa = (model.net(io["x"], io["t"]) - io["output"]).abs().max().item()
        assert diff_sdpa <= 1e-4, f"{name} (sdpa): max abs diff {diff_sdpa:.2e}"


def test_parameter_order_matches_checkpoint_order():
    """EMA shadow lists (I2SB) are in parameters() order: ours must equal the checkpoint's key order."""
    path, configs = _configs()
    for name, cfg in configs.items():
        keys = list(torch.load(path / f"{name}.pt", weights_only=True))
        assert list(build_unet(load_flags(cfg["flags"])).state_dict()) == keys, name


def test_flag_string_and_files_agree(tmp_path):
    text = (
        "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 500 --learn_sigma True "
        "--noise_schedule linear --num_channels 128 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True --image_size 128"
    )
    flags = load_flags(text)
    assert flags.num_channels == 128 and flags.learn_sigma and flags.use_fp16 and flags.diffusion_steps == 500
    assert flags.channel_mult_tuple() == (1, 1, 2, 3, 4)
    assert flags.attention_ds() == (4, 8, 16)
    (tmp_path / "flags.sh").write_text(f'MODEL_FLAGS="{text}"\n# comment\n')
    (tmp_path / "flags.json").write_text(json.dumps(parse_flag_string(text)))
    (tmp_path / "flags.toml").write_text("\n".join(f'{k} = "{v}"' for k, v in parse_flag_string(text).items()))
    for name in ("flags.sh", "flags.json", "flags.toml"):
        assert load_flags(str(tmp_path / name)) == flags, name
    assert load_flags("--num_channels=64 --batch_size 4").num_channels == 64  # script-only flags ignored


def test_bad_flags_fail_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown ADM flag.*--num_chanels"):
        load_flags("--num_chanels 128")
    with pytest.raises(UsageError, match="not a valid bool"):
        load_flags("--learn_sigma maybe")
    with pytest.raises(UsageError, match="no such file"):
        load_flags(str(tmp_path / "missing.json"))
    with pytest.raises(UsageError, match="no default channel_mult"):
        load_flags("--image_size 48").channel_mult_tuple()


def test_wrong_flags_name_the_mismatch(tmp_path):
    path, configs = _configs()
    name, cfg = next(iter(configs.items()))
    flags = dict(cfg["flags"], num_channels=64)
    with pytest.raises(UsageError, match=r"does not match the network built from the flags.*shape"):
        load_adm(path / f"{name}.pt", flags)


def test_pickled_checkpoint_needs_trust(tmp_path):
    flags = ADMFlags(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16", num_heads=2
    )
    net = build_unet(flags)
    torch.save(net, tmp_path / "full.pt")  # a whole pickled module, not a state dict
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_adm(tmp_path / "full.pt", flags)
    model = load_adm(tmp_path / "full.pt", flags, trust_pickle=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.net(x, torch.tensor([3, 7])), net.eval()(x, torch.tensor([3, 7])), atol=1e-6)


def test_safetensors_checkpoint_and_fp16_flag_on_cpu(tmp_path, capsys):
    from safetensors.torch import save_file

    flags = ADMFlags(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult="1,2",
        attention_resolutions="16",
        num_heads=2,
        learn_sigma=True,
        use_fp16=True,
    )
    net = build_unet(flags).eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    model = load_adm(tmp_path / "w.safetensors", flags, device="cpu")
    assert model.dtype == torch.float32
    assert "computing in float32 on CPU" in capsys.readouterr().err
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x, 5), net(x, torch.tensor([5.0])), atol=1e-6)


def test_gradient_checkpointing_same_gradients():
    flags = ADMFlags(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1", attention_resolutions="8", num_heads=2
    )
    torch.manual_seed(0)
    net = build_unet(flags)
    for p in net.parameters():  # the zero-initialised layers would hide differences
        p.data.normal_(0, 0.05)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10.0, 500.0])

    def grad():
        xi = x.clone().requires_grad_(True)
        net(xi, t).square().mean().backward()
        return xi.grad

    g_plain = grad()
    net.set_gradient_checkpointing(True)
    g_ckpt = grad()
    assert torch.allclose(g_plain, g_ckpt, atol=1e-6)


@pytest.mark.slow  # bf16 convolutions are slow on CPU
def test_half_precision_torso_code_path_on_cpu():
    """The fp16/bf16 path (torso convs in half precision, norms and head in fp32) exercised with bf16 on CPU;
    the GPU tests check fp16/bf16 on CUDA."""
    from safetensors.torch import load_file

    path, configs = _configs()
    name, cfg = next(iter(configs.items()))
    model = load_adm(path / f"{name}.pt", cfg["flags"])
    model.net.convert_torso(torch.bfloat16)
    assert model.net.input_blocks[1][0].in_layers[2].weight.dtype == torch.bfloat16
    assert model.net.out[2].weight.dtype == torch.float32 and model.net.time_embed[0].weight.dtype == torch.float32
    io = load_file(str(path / f"{name}_io.safetensors"))
    model.net.set_gradient_checkpointing(True)
    x = io["x"].clone().requires_grad_(True)
    out = model.net(x, io["t"])
    assert out.dtype == torch.float32
    rel = ((out - io["output"]).abs().max() / io["output"].abs().max()).item()
    assert rel < 6e-2, rel  # bf16 keeps 8 mantissa bits; measured 1.4-2.6e-2 on the fixture configs
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
