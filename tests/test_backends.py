"""Forward-only backends: the ONNX Runtime export, its cache, the parity gate (accepts a faithful export,
refuses a diverging or tampered one with the measured error), fallbacks with one-line notices, and DiME
through `cfx explain --backend onnx` against `--backend torch`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cfx

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class SmallNet(torch.nn.Module):
    """A conv net with a timestep input, like a UNet's (x, t) → tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.emb = torch.nn.Linear(1, 8)
        self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.conv1(x) + self.emb(t[:, None] / 1000)[:, :, None, None])
        return self.conv2(h)


class Diverging(SmallNet):
    """``float(t[0])`` is a Python number when traced: the export bakes in the example's timestep."""

    def forward(self, x, t):
        return super().forward(x, t) * float(t[0])


def example():
    return (torch.zeros(1, 3, 16, 16), torch.zeros(1))


def notices():
    seen: list[str] = []
    return seen, seen.append


def test_gate_accepts_a_faithful_export_and_the_second_use_is_a_cache_hit(tmp_path):
    from cfx_cli.backends import onnx_backend

    net = SmallNet().eval()
    seen, notice = notices()
    first = onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path), notice=notice)
    assert first.parity_error <= 1e-4 and not first.cache_hit
    assert len(seen) == 1 and "exporting" in seen[0]
    assert onnx_backend.cached(net, example(), "onnx", "fp32", "cpu", str(tmp_path))
    second = onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path), notice=notice)
    assert second.cache_hit and len(seen) == 1  # no second export
    assert second.path == first.path
    # dynamic batch: a batch of 5 matches torch
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([1.0, 10, 100, 500, 999])
    with torch.no_grad():
        ref = net(x, t)
    assert torch.allclose(second(x, t), ref, rtol=1e-4, atol=1e-5)
    # another model (other weights) is another cache entry
    other = SmallNet()
    with torch.no_grad():
        other.conv2.bias += 1
    assert not onnx_backend.cached(other, example(), "onnx", "fp32", "cpu", str(tmp_path))


def test_gate_refuses_a_diverging_export_with_the_measured_error(tmp_path):
    from cfx_cli.backends import TorchBackend, build_backend, onnx_backend
    from cfx_cli.backends.base import ParityError

    net = Diverging().eval()
    with pytest.raises(ParityError) as info:
        onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path))
    assert info.value.error > 1e-4
    assert f"differs from torch by {info.value.error:.3g}" in str(info.value)
    assert not onnx_backend.cached(net, example(), "onnx", "fp32", "cpu", str(tmp_path))
    seen, notice = notices()
    got = build_backend(net, example(), "onnx", cache_dir=str(tmp_path), notice=notice, label="diverging")
    assert isinstance(got, TorchBackend)
    refusals = [s for s in seen if "refused" in s]
    assert len(refusals) == 1 and "differs from torch by" in refusals[0] and refusals[0].endswith("using torch")


def test_gate_refuses_a_tampered_or_truncated_cached_file(tmp_path):
    import onnx

    from cfx_cli.backends import onnx_backend
    from cfx_cli.backends.base import BackendError, ParityError

    net = SmallNet().eval()
    built = onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path))
    proto = onnx.load(str(built.path))
    init = next(i for i in proto.graph.initializer if len(i.dims) == 4)  # a conv kernel
    arr = onnx.numpy_helper.to_array(init) * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(proto, str(built.path))
    with pytest.raises(ParityError, match=r"differs from torch by \d"):
        onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path))
    meta = json.loads((built.path.parent / "meta.json").read_text())
    assert meta["validated"] is False and float(meta["parity_error"]) > 1e-4  # `auto` will not pick it again
    assert not onnx_backend.cached(net, example(), "onnx", "fp32", "cpu", str(tmp_path))
    built.path.write_bytes(built.path.read_bytes()[:100])
    with pytest.raises(BackendError, match=r"cannot load .*model\.onnx"):
        onnx_backend.build(net, example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path))


def test_missing_library_and_missing_gpu_fall_back_with_one_line(tmp_path, monkeypatch):
    import sys

    from cfx_cli.backends import TorchBackend, build_backend

    seen, notice = notices()
    got = build_backend(SmallNet(), example(), "tensorrt", device="cpu", cache_dir=str(tmp_path), notice=notice)
    assert isinstance(got, TorchBackend) and "tensorrt needs a CUDA device" in seen[-1]
    assert not list(tmp_path.rglob("model.onnx"))  # refused before any export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    got = build_backend(SmallNet(), example(), "onnx", cache_dir=str(tmp_path), notice=notice)
    assert isinstance(got, TorchBackend) and "onnxruntime is not installed" in seen[-1]
    assert all("\n" not in s for s in seen)


def test_silent_provider_fallback_is_detected(tmp_path):
    from cfx_cli.backends import onnx_backend
    from cfx_cli.backends.base import BackendError

    built = onnx_backend.build(SmallNet().eval(), example(), "onnx", "fp32", "cpu", cache_dir=str(tmp_path))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the check below needs a CPU-only build")
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        onnx_backend._session(built.path, ["CUDAExecutionProvider", "CPUExecutionProvider"], "onnx", "cuda")


def _pngs(run: Path) -> dict[str, np.ndarray]:
    from cfx_cli.images import decode

    return {p.stem: decode(p) for p in sorted((run / "counterfactuals").glob("*.png"))}


@pytest.mark.slow
def test_dime_through_onnx_matches_torch_and_accelerate_feeds_auto(tmp_path, demo_images):
    env = {"CFX_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["-m", "dime", "--limit", "3", "--set", "tau=6", "--set", "scales=10,20", "--seed", "1"]
    runs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        r = run_cfx("explain", str(demo_images), *common, "--backend", backend, "-o", str(out), env=env)
        assert r.returncode in (0, 3), r.stderr
        runs[backend] = out
    a, b = _pngs(runs["torch"]), _pngs(runs["onnx"])
    assert len(a) == 3 and a.keys() == b.keys()
    for k in a:  # 8-bit PNGs after 6 guided steps + the unguided chains: at most one grey level apart
        assert np.abs(a[k].astype(float) - b[k].astype(float)).max() <= 1.0 / 255 + 1e-6, k
    recs = [json.loads(line) for line in (runs["onnx"] / "manifest.jsonl").read_text().splitlines()]
    assert {r["params"]["backend"] for r in recs if r.get("params")} == {"onnx (CPU, fp32)"}
    r = run_cfx("accelerate", "demo:pixel", env=env)
    assert r.returncode == 0 and "cached build reused" in r.stdout and "parity" in r.stdout, r.stdout + r.stderr
    r = run_cfx("explain", str(demo_images), *common, "-o", str(tmp_path / "auto"), env=env)
    recs = [json.loads(line) for line in (tmp_path / "auto" / "manifest.jsonl").read_text().splitlines()]
    assert {r["params"]["backend"] for r in recs if r.get("params")} == {"onnx (CPU, fp32)"}


@pytest.mark.slow
def test_ace_refinement_through_onnx_matches_torch(tmp_path, monkeypatch, demo_images):
    """In-process: ACE on 2 demo digits with --backend onnx vs torch (the refinement is the onnx part)."""
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.explainers import ExplainBatch, ExplainContext, RunOptions
    from cfx_cli.images import decode
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    monkeypatch.setenv("CFX_CACHE_DIR", str(tmp_path))
    clf = load_classifier("demo:digits", ClassifierOptions())
    cls = get_explainer_class("ace")
    params = resolve_params("ace", cls.params, cls.presets, {"iterations": "3", "tau": "4", "respacing": "50"})
    paths = sorted(demo_images.glob("*.png"))[:2]
    images = torch.from_numpy(np.stack([decode(p) for p in paths])).permute(0, 3, 1, 2).float().contiguous()
    batch = ExplainBatch(ids=[p.stem for p in paths], images=images, targets=torch.tensor([5, 7]),
                         sources=torch.tensor([0, 1]), seeds=[3, 4])
    outs = {}
    for backend in ("torch", "onnx"):
        exp = cls(ExplainContext(classifier=clf, params=params, options=RunOptions(backend=backend)))
        outs[backend] = exp.explain(batch)
    assert [o.params["backend"] for o in outs["onnx"]] == ["onnx (CPU, fp32)"] * 2
    assert [o.params["backend"] for o in outs["torch"]] == ["torch (fp32)"] * 2
    for i, (a, b) in enumerate(zip(outs["torch"], outs["onnx"], strict=True)):
        assert (a.counterfactual - b.counterfactual).abs().max() <= 1e-3
        assert (a.counterfactual - images[i]).abs().max() > 0.05  # a real edit happened (not a copy)


@pytest.mark.slow
def test_time_through_onnx_matches_torch_and_accelerate_feeds_auto(tmp_path, monkeypatch, demo_images):
    """In-process: TIME on 3 demo digits with --backend onnx vs torch (UNet ε, VAE encode and decode on ONNX
    Runtime); the counterfactuals agree within 1e-3, and `cfx accelerate demo:latent` builds what auto uses."""
    from cfx_cli.classifiers import ClassifierOptions, load_classifier
    from cfx_cli.explainers import ExplainBatch, ExplainContext, RunOptions
    from cfx_cli.images import decode
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    monkeypatch.setenv("CFX_CACHE_DIR", str(tmp_path / "cache"))
    clf = load_classifier("demo:digits", ClassifierOptions())
    cls = get_explainer_class("time")
    params = resolve_params("time", cls.params, cls.presets, {"preset": "digits", "schedule": "10:2"})
    paths = sorted(demo_images.glob("*.png"))[:3]
    images = torch.from_numpy(np.stack([decode(p) for p in paths])).permute(0, 3, 1, 2).float().contiguous()
    sources = clf.predict_proba(images).argmax(1)
    batch = ExplainBatch(ids=[p.stem for p in paths], images=images, targets=(sources + 3) % 10,
                         sources=sources, seeds=[0, 1, 2])
    outs = {}
    for backend in ("torch", "onnx", "auto"):
        exp = cls(ExplainContext(classifier=clf, params=params, options=RunOptions(backend=backend)))
        outs[backend] = exp.explain(batch)
        if backend == "onnx":
            r = run_cfx("accelerate", "demo:latent", env={"CFX_CACHE_DIR": str(tmp_path / "cache")})
            assert r.returncode == 0, r.stderr
            assert r.stdout.count("cached build reused") == 3, r.stdout  # unet, vae decoder, vae encoder
    assert [o.params["backend"] for o in outs["torch"]] == ["torch (fp32)"] * 3
    assert [o.params["backend"] for o in outs["onnx"]] == ["onnx (CPU, fp32)"] * 3
    assert [o.params["backend"] for o in outs["auto"]] == ["onnx (CPU, fp32)"] * 3  # the validated cache
    for i, (a, b) in enumerate(zip(outs["torch"], outs["onnx"], strict=True)):
        assert (a.counterfactual - b.counterfactual).abs().max() <= 1e-3
        assert (a.counterfactual - images[i]).abs().max() > 0.05  # a real edit happened (not a copy)


def test_torch_backend_precision_and_compile_mode_options(tmp_path, demo_images):
    from cfx_cli.backends import TorchBackend

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    for precision, tol in (("fp32", 1e-6), ("bf16", 5e-2)):
        b = TorchBackend(net, precision, channels_last=True)
        err = float((b(x) - ref).abs().max() / ref.abs().max())
        assert err <= tol and b.name == f"torch ({precision}, channels_last)"
    assert net[0].weight.dtype == torch.float32  # the caller's module is never converted
    low = TorchBackend(net.to(torch.bfloat16), "fp32")  # a low-precision model gets an fp32 copy
    assert low(x).dtype == torch.float32 and low.module[0].weight.dtype == torch.float32
    assert net[0].weight.dtype == torch.bfloat16
    for args, message in ((["--precision", "fp8"], "--precision 'fp8'"),
                          (["--compile-mode", "reduce-overhead"], "--compile-mode needs --compile"),
                          (["--compile", "--compile-mode", "fast"], "--compile-mode 'fast'")):
        r = run_cfx("explain", str(demo_images), "-m", "pgd", "-o", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_time_sd_bench_runs_and_reports_every_column(tmp_path):
    """bench/time_sd_backends.py (the GPU benchmark) on a narrow SD-layout model on the CPU: the table and the
    JSON carry the reference row, ratios, FLOPs, and a refused backend's reason."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "time_sd_backends.py"), "--device", "cpu", "--small",
                        "--resolution", "64", "--tau", "2", "--steps", "4", "--repeats", "1",
                        "--variants", "eager,channels_last,tensorrt", "--out", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "CFX_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"eager", "channels_last"} and rows["eager"]["ratio"] == 1.0
    assert data["flops"] > 1e9 and all(row["seconds"] > 0 for row in rows.values())
    assert rows["channels_last"]["backend"] == "torch (fp32, channels_last)"
    assert any("tensorrt: refused" in n and "CUDA" in n for n in data["notes"]), data["notes"]
    assert "s/explanation" in r.stdout and "× vs eager" in r.stdout
