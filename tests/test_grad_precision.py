"""--precision for the differentiated network calls (cfx_cli/backends/grad.py): the gate compares output and input
gradient with fp32 and refuses with one line, fp16 loss scaling keeps small gradients and backs off on overflow, and
PGD, RCSB and ECED (which have no forward-only calls) run under autocast from the CLI, close to their fp32 runs."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cfx
from PIL import Image
from typer.testing import CliRunner

from cfx_cli import plugins
from cfx_cli.backends.grad import (
    FP32,
    INITIAL_SCALE,
    GradCheck,
    GradPrecision,
    Parity,
    describe,
    grad_network,
    grad_precision,
    measure_grad_parity,
)
from cfx_cli.cli import app
from cfx_cli.errors import UsageError
from cfx_cli.explain.pipeline import run_explain
from cfx_cli.explain.request import ExplainRequest
from cfx_cli.explainers import Explainer, ExplainOutput, RunOptions
from cfx_cli.hookspecs import hookimpl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _context(precision: str) -> SimpleNamespace:
    return SimpleNamespace(options=RunOptions(backend_precision=precision), device="cpu")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(16, 3, 3, padding=1)).eval()


def test_gate_accepts_autocast_and_measures_output_and_gradient():
    net = _net()
    lines: list[str] = []
    for precision in ("bf16", "fp16"):
        amp = grad_precision(_context(precision), [GradCheck("net", net, (torch.zeros(1, 3, 16, 16),))],
                             notice=lines.append)
        assert amp.name == f"autocast {precision}" and amp.precision == precision
        # it really ran in half precision (a non-zero error) and within the forward gate's tolerance
        measured = amp.parity["net"]
        assert 0 < measured.output <= {"bf16": 5e-2, "fp16": 2e-2}[precision]
        assert 0 < measured.gradient <= 0.1
        with amp.autocast():
            assert net(torch.zeros(1, 3, 8, 8)).dtype == amp.dtype
    assert not lines
    assert grad_precision(_context("fp32"), [GradCheck("net", net, (torch.zeros(1, 3, 16, 16),))]) is FP32
    assert net[0].weight.dtype == torch.float32  # the weights are never converted


def test_gate_refuses_with_one_line_and_the_method_runs_in_fp32():
    net = _net()
    lines: list[str] = []
    amp = grad_precision(_context("bf16"), [GradCheck("the demo net", net, (torch.zeros(1, 3, 16, 16),))],
                         notice=lines.append, tolerance=1e-9)
    assert amp is FP32 and amp.name == "fp32"
    assert len(lines) == 1 and "the demo net" in lines[0] and "parity gate" in lines[0] and "fp32" in lines[0]

    def no_half_kernel(x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("\"slow_conv\" not implemented for 'BFloat16'\nC++ traceback ...")
        return x * 2

    lines.clear()
    amp = grad_precision(_context("bf16"), [GradCheck("odd op", no_half_kernel, (torch.zeros(1, 3, 4, 4),))],
                         notice=lines.append)
    assert amp is FP32 and len(lines) == 1 and "not implemented for 'BFloat16'" in lines[0]


def test_gate_compares_the_input_gradient_too():
    """A call whose forward is exact under autocast but whose gradient breaks is refused (the gate backpropagates)."""

    class BadBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.half = torch.is_autocast_enabled("cpu")
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * (float("nan") if ctx.half else 2.0)

    check = GradCheck("bad backward", BadBackward.apply, (torch.zeros(1, 3, 4, 4),))
    assert measure_grad_parity(check, "bf16", "cpu").gradient == float("inf")
    assert grad_precision(_context("bf16"), [check], notice=lambda m: None) is FP32


def test_fp16_loss_scaling_keeps_small_gradients_and_backs_off_on_overflow():
    net = _net()
    x = torch.randn(2, 3, 16, 16)

    def grads(amp: GradPrecision, weight: float, scaled: bool = True):
        xi = x.clone().requires_grad_(True)
        with amp.autocast():
            out = net(xi)
        loss = (out.float() * weight).sum()  # as the methods do: the loss in fp32
        return (amp.grad(loss, xi) if scaled else torch.autograd.grad(loss, xi))[0]

    ref = grads(FP32, 1e-8)
    half = GradPrecision("fp16")
    unscaled = grads(half, 1e-8, scaled=False)
    assert float(unscaled.abs().max()) == 0.0  # 1e-8 underflows in fp16: the gradient is lost without scaling
    got = grads(half, 1e-8)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2 and half.scale == INITIAL_SCALE
    big = GradPrecision("fp16")
    ref = grads(FP32, 100.0)
    got = grads(big, 100.0)  # 100 × 2^16 overflows fp16: the scale drops and the backward reruns
    assert torch.isfinite(got).all() and big.scale < INITIAL_SCALE
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2


def _images(run) -> dict[str, np.ndarray]:
    out = {}
    for line in (run / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = (np.asarray(Image.open(run / r["counterfactual"]), dtype=np.float64) / 255, r)
    return out


def _explain(out, images, method: str, options: RunOptions, settings: dict[str, str], limit: int) -> dict:
    """One in-process `cfx explain` (the pipeline the command runs; the demo models stay loaded between runs)."""
    req = ExplainRequest(inputs=[str(images)], method=method, classifier="demo:digits", out=str(out), limit=limit,
                         overwrite=True, set_options=dict(settings), options=options, device="cpu")
    run_explain(req, progress_stream=io.StringIO())
    return _images(out)


#: per method: the settings that keep it short, and the variants beside fp32 (ECED: checkpointing too)
CASES = {
    "pgd": ({}, ["bf16"]),
    "rcsb": ({}, ["bf16", "channels_last"]),
    "ace": ({"iterations": "3"}, ["bf16", "channels_last"]),
    # early_stop off: the attack step uses the gradient, so checkpointing's recomputation matters
    "eced": ({"iterations": "1", "bg_iterations": "3", "early_stop": "false"}, ["bf16", "channels_last", "ckpt"]),
}
VARIANTS = {"bf16": (RunOptions(backend_precision="bf16"), {}), "channels_last": (RunOptions(channels_last=True), {}),
            "ckpt": (RunOptions(backend_precision="bf16"), {"checkpoint": "true"})}


@pytest.mark.parametrize("method", list(CASES))
def test_differentiated_calls_under_bf16_and_channels_last_stay_close_to_fp32(tmp_path, demo_images, method, capsys):
    """bf16: the gradients ran under autocast (the record says so, with the gate's errors) and the edit is the fp32
    one up to precision; channels_last: the same counterfactuals within one 8-bit level; ECED's checkpointing under
    bf16 recomputes the same chain (identical)."""
    settings, variants = CASES[method]
    ref = _explain(tmp_path / "fp32", demo_images, method, RunOptions(), settings, 2)
    runs = {v: _explain(tmp_path / v, demo_images, method, VARIANTS[v][0], {**settings, **VARIANTS[v][1]}, 2)
            for v in variants}
    assert "refused" not in capsys.readouterr().err  # every gate passed on the demo networks
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["backend"]["backend_precision"] == "bf16"
    for key, (img, rec) in runs["bf16"].items():
        assert ref[key][1]["params"]["gradients"] == "fp32" and rec["status"] != "error"
        ran = rec["params"]["gradients"]
        gate = re.fullmatch(r"autocast bf16 \(gate: output ([\d.e-]+), gradient ([\d.e-]+)\)", ran)
        assert gate and 0 < float(gate[1]) <= 5e-2 and 0 < float(gate[2]) <= 0.1, ran
        # the same edit up to precision: PGD's sign steps flip where a gradient is near 0, so mean, not max
        assert float(np.abs(img - ref[key][0]).mean()) < 0.01, key
    for key, (img, rec) in runs.get("channels_last", {}).items():
        assert rec["params"]["gradients"] == "fp32, channels_last"
        assert float(np.abs(img - ref[key][0]).max()) <= 1 / 255 + 1e-9, key  # one 8-bit level at most
    for key, (img, _) in runs.get("ckpt", {}).items():
        assert np.array_equal(img, runs["bf16"][key][0]), key


def test_options_a_method_cannot_honour_are_refused_with_one_line_naming_them(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "rcsb", "--backend", "onnx", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--backend does not apply" in proc.stderr
    assert "only --precision, --channels-last, --compile apply" in proc.stderr
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--compile", "--channels-last", "--out",
                   str(tmp_path / "r"))
    assert proc.returncode == 2 and "--channels-last, --compile do not apply" in proc.stderr

    class Copy(Explainer):  # neither forward-only calls nor differentiated ones
        name = "copy_probe"

        def explain(self, batch):
            return [ExplainOutput(counterfactual=img) for img in batch.images]

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(Copy)

    plugins.reset()
    plugins.register_plugin(Plugin(), name="copy-probe")
    try:
        res = CliRunner().invoke(app, ["explain", str(demo_images), "--method", "copy_probe", "--precision", "bf16",
                                       "--out", str(tmp_path / "c")])
    finally:
        plugins.reset()
    # in process the usage error reaches the caller (the installed `cfx` prints it as one line, exit 2)
    assert isinstance(res.exception, UsageError)
    assert "--precision does not apply (it runs no network calls these options apply to)" in str(res.exception)


def _options_context(**options) -> SimpleNamespace:
    return SimpleNamespace(options=RunOptions(**options), device="cpu")


def _call(net, x):
    return net(x)


def test_grad_network_compiles_and_copies_channels_last_behind_the_gate(monkeypatch):
    net = _net()
    example = (torch.zeros(1, 3, 16, 16),)
    assert grad_network(_options_context(), net, _call, example, "net") is net  # nothing asked: the module itself
    # torch.compile's AOTAutograd path without inductor's C++ build (minutes on this CPU; the CLI uses inductor)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: real_compile(m, backend="aot_eager"))
    lines: list[str] = []
    got = grad_network(_options_context(channels_last=True, compile=True), net, _call, example, "net",
                       notice=lines.append)
    assert got is not net and not lines
    parity = {"a": Parity(0.00312, 0.01), "b": Parity(0.001, 0.0234)}
    assert describe(GradPrecision("bf16", parity=parity), got) == \
        "autocast bf16 (gate: output 0.00312, gradient 0.0234), channels_last, compile"
    assert describe(FP32, net) == "fp32"
    x = torch.randn(2, 3, 16, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(net(xa).square().sum(), xa)
    (gb,) = torch.autograd.grad(got(xb).square().sum(), xb)
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
    assert next(net.parameters()).is_contiguous()  # the loaded weights were not converted


def test_grad_network_refuses_a_diverging_or_failing_compile_with_one_line(monkeypatch):
    net = _net()
    example = (torch.zeros(1, 3, 16, 16),)
    lines: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: lambda x: m(x) * 1.01)
    assert grad_network(_options_context(compile="max-autotune"), net, _call, example, "the bridge",
                        notice=lines.append) is net
    assert len(lines) == 1 and "the bridge" in lines[0] and "parity gate" in lines[0] and "eagerly" in lines[0]

    def broken(m, mode=None):
        def run(x):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n...")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    lines.clear()
    conv = torch.nn.Conv2d(3, 3, 1)
    assert grad_network(_options_context(compile=True), conv, _call, example, "unet", notice=lines.append) is conv
    assert len(lines) == 1 and "CppCompileError" in lines[0] and "unet" in lines[0]
