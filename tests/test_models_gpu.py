"""Half precision and memory options on a GPU (skipped where there is none)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fixture_dir

from cfx_cli.models.memory import MemoryOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_adm_half_precision_close_to_fp32(precision):
    from safetensors.torch import load_file

    from cfx_cli.models.adm import load_adm

    path = fixture_dir("adm-unet")
    for name, cfg in json.loads((path / "configs.json").read_text()).items():
        model = load_adm(
            path / f"{name}.pt",
            cfg["flags"],
            device="cuda",
            memory=MemoryOptions(precision=precision, attention="sdpa", gradient_checkpointing=True),
        )
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        assert model.net.input_blocks[0][0].weight.dtype == dtype
        assert model.net.out[2].weight.dtype == torch.float32  # the output head stays fp32, as in ADM
        io = load_file(str(path / f"{name}_io.safetensors"))
        with torch.no_grad():
            out = model.net(io["x"].cuda(), io["t"].cuda()).float().cpu()
        rel = ((out - io["output"]).abs().max() / io["output"].abs().max()).item()
        assert rel < (2e-2 if precision == "fp16" else 6e-2), (name, rel)
        x = io["x"].cuda().requires_grad_(True)  # checkpointed backward works in half precision
        model.net(x, io["t"].cuda()).float().square().mean().backward()
        assert torch.isfinite(x.grad).all()


def test_use_fp16_flag_honoured_on_gpu():
    from cfx_cli.models.adm import load_adm

    path = fixture_dir("adm-unet")
    name, cfg = next(iter(json.loads((path / "configs.json").read_text()).items()))
    model = load_adm(path / f"{name}.pt", dict(cfg["flags"], use_fp16=True), device="cuda")
    assert model.dtype == torch.float16
