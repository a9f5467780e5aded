"""ONNX Runtime backend: export (TorchScript exporter, dynamic batch and spatial axes), an on-disk cache keyed
by model hash + shapes + precision + backend + device + library versions, execution-provider selection with
detection of a provider that silently fell back to CPU, and the parity gate before first use.

TensorRT goes through ONNX Runtime's ``TensorrtExecutionProvider`` with its engine cache in the same folder.
That path has never run on a GPU in this project: it is unverified (docs/backends.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cfx_cli.backends.base import BackendError, ForwardBackend, ParityError

OPSET = 17
#: max |onnx − torch| / max |torch| accepted by the gate, per precision
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def cache_root(cache_dir: str | None = None) -> Path:
    base = cache_dir or os.environ.get("CFX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cfx")
    return Path(base) / "backends"


def _versions() -> dict[str, str]:
    from importlib import metadata as md

    out = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def model_hash(module: Any) -> str:
    """sha256 over the class name and every parameter/buffer (name, dtype, shape, bytes)."""
    import torch

    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def cache_key(module: Any, example_inputs: Sequence[Any], kind: str, precision: str, device: str) -> dict:
    shapes = [[str(t.dtype), list(t.shape[1:])] for t in example_inputs]
    return {"model": model_hash(module), "inputs": shapes, "backend": kind, "precision": precision,
            "device": _gpu_name(device), "opset": OPSET, "versions": _versions()}


def _entry(module, example_inputs, kind, precision, device, cache_dir) -> tuple[Path, dict]:
    key = cache_key(module, example_inputs, kind, precision, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root(cache_dir) / digest, key


def cached(module, example_inputs, kind, precision, device, cache_dir=None) -> bool:
    """Is there a validated build for this exact model/shapes/precision/versions? (what ``auto`` uses)"""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    folder, _ = _entry(module, example_inputs, kind, precision, device, cache_dir)
    meta = folder / "meta.json"
    return meta.is_file() and (folder / "model.onnx").is_file() and json.loads(meta.read_text()).get("validated")


def providers_for(kind: str, device: str, folder: Path, precision: str) -> list:
    """Execution providers to request, best first. The CPU provider is always last (ORT's own fallback)."""
    if kind == "tensorrt":
        if not device.startswith("cuda"):
            raise BackendError("tensorrt needs a CUDA device (--device cuda)")
        idx = int(device.partition(":")[2] or 0)
        trt = {"device_id": idx, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder / "trt"),
               "trt_fp16_enable": precision == "fp16"}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": idx}),
                "CPUExecutionProvider"]
    if device.startswith("cuda"):
        return [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _export(module, example_inputs, path: Path, precision: str) -> list[str]:
    import copy

    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    net = module if precision == "fp32" else copy.deepcopy(module).to(dtype)
    args = tuple(t.to(dtype) if t.is_floating_point() and t.ndim >= 2 else t for t in example_inputs)
    names = [f"input{i}" for i in range(len(args))]
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, args, strict=True):
        axes[name] = {0: "batch"}
        if t.ndim == 4:  # images/latents: spatial axes dynamic where the graph allows (the key still pins them)
            axes[name].update({2: "height", 3: "width"})
    axes["output"] = {0: "batch"}
    tmp = path.with_suffix(".tmp.onnx")
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings are noise here; the parity gate judges the result
        torch.onnx.export(net.eval(), args, str(tmp), input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    os.replace(tmp, path)
    return names


class OnnxBackend(ForwardBackend):
    def __init__(self, session: Any, input_dtypes: list, kind: str, precision: str, path: Path) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.input_dtypes = input_dtypes
        self.path = path
        self.providers = session.get_providers()
        where = self.providers[0].replace("ExecutionProvider", "")
        self.name = f"{kind} ({where}, {precision})"

    def __call__(self, *inputs):
        import numpy as np
        import torch

        feed = {name: np.ascontiguousarray(t.detach().cpu().numpy().astype(dt, copy=False))
                for name, t, dt in zip(self.inputs, inputs, self.input_dtypes, strict=True)}
        out = self.session.run(None, feed)[0]
        return torch.from_numpy(out).float().to(inputs[0].device)


def _check_provider(providers: list) -> None:
    import onnxruntime as ort

    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    available = ort.get_available_providers()
    if first not in available:
        raise BackendError(f"onnxruntime {ort.__version__} has no {first} (available: {', '.join(available)})")


def _session(path: Path, providers: list, kind: str, device: str):
    import onnxruntime as ort

    wanted = [p if isinstance(p, str) else p[0] for p in providers]
    _check_provider(providers)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # ORT's idle threads spin by default; between calls cfx runs torch (the classifier's gradients) on the same
    # cores, and the spinning starves it
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    import torch

    opts.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch (OMP_NUM_THREADS)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # unreadable/corrupt file, unsupported op, provider init failure
        raise BackendError(f"cannot load {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    got = sess.get_providers()
    if got[0] != wanted[0]:  # ORT falls back to CPU silently when a provider fails to initialise
        raise BackendError(f"{wanted[0]} was requested but the session runs on {got[0]} (silent fallback)")
    return sess


def _numpy_dtypes(session) -> list:
    import numpy as np

    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    out = []
    for i in session.get_inputs():
        if i.type not in table:
            raise BackendError(f"input {i.name} has unsupported type {i.type}")
        out.append(table[i.type])
    return out


def parity_inputs(example_inputs: Sequence[Any], batch: int = 2, seed: int = 1234) -> list:
    """Random inputs like ``example_inputs`` with another batch size (exercises the dynamic axis); 1-D float
    inputs are diffusion timesteps, drawn in [0, 1000)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example_inputs:
        shape = (batch, *t.shape[1:])
        if t.ndim == 1:
            vals = torch.randint(0, 1000, shape, generator=g)
            out.append(vals.to(t.dtype))
        elif t.is_floating_point():
            out.append(torch.randn(shape, generator=g).to(t.dtype))
        else:
            out.append(torch.randint(0, 10, shape, generator=g).to(t.dtype))
    return out


def measure_parity(module, backend: ForwardBackend, example_inputs: Sequence[Any]) -> float:
    """max |backend − torch| / max |torch| on random inputs (torch in fp32, the reference)."""
    import torch

    inputs = parity_inputs(example_inputs)
    with torch.no_grad():
        ref = module(*inputs).float()
    got = backend(*inputs).float()
    if got.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def build(module, example_inputs, kind: str, precision: str, device: str, *, cache_dir: str | None = None,
          tolerance: float | None = None, notice: Callable[[str], None] | None = None,
          label: str = "model") -> OnnxBackend:
    """Export (or reuse the cached export), open a session and run the parity gate. Raises BackendError."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendError("onnxruntime is not installed (pip install 'cfx[onnx]')") from None
    folder, key = _entry(module, example_inputs, kind, precision, device, cache_dir)
    path = folder / "model.onnx"
    meta_path = folder / "meta.json"
    providers = providers_for(kind, device, folder, precision)  # before exporting: a missing GPU fails fast
    _check_provider(providers)  # likewise a missing execution provider (an SD UNet export takes minutes)
    if not path.is_file():
        try:
            import onnx  # noqa: F401  (the TorchScript exporter writes the protobuf through it)
        except ImportError:
            raise BackendError("exporting needs the onnx package (pip install onnx)") from None
        folder.mkdir(parents=True, exist_ok=True)
        if notice:
            notice(f"note: exporting {label} to ONNX for --backend {kind} (first use; cached in {folder})")
        try:
            _export(module, example_inputs, path, precision)
        except Exception as exc:
            raise BackendError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        meta_path.write_text(json.dumps({"key": key, "validated": False}, indent=1))
    sess = _session(path, providers, kind, device)
    backend = OnnxBackend(sess, _numpy_dtypes(sess), kind, precision, path)
    backend.cache_hit = bool(meta_path.is_file() and json.loads(meta_path.read_text()).get("validated"))
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    err = measure_parity(module, backend, example_inputs)
    backend.parity_error = err
    if not err <= tol:  # recorded, so that `auto` stops picking this entry
        meta_path.write_text(json.dumps({"key": key, "validated": False, "parity_error": str(err), "tolerance": tol},
                                        indent=1))
        raise ParityError(f"parity gate: {path} differs from torch by {err:.3g} (max relative error; tolerance "
                          f"{tol:g})", err, tol)
    meta_path.write_text(json.dumps({"key": key, "validated": True, "parity_error": err, "tolerance": tol},
                                    indent=1))
    return backend
