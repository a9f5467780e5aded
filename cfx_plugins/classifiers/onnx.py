"""``onnx:PATH``: an ONNX model run by ONNX Runtime (black-box: probabilities only).

Needs the ``onnx`` extra (``pip install 'cfx[onnx]'``). The input layout (NCHW or NHWC), size and
element type come from the model's first input; labels from the model's metadata property ``labels``
(a JSON list, or names separated by newlines or commas) or ``--labels FILE``. Options:
``#logits=1`` (the model returns logits: softmax them; also the metadata property ``logits``),
``#mean=..&std=..`` (normalization the graph does not include), ``#size=HxW`` (for models with
dynamic spatial axes).
"""

from __future__ import annotations

import json
from pathlib import Path

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions, check_probabilities
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import Option, resize_batch, resolve_options, split_options


def onnx_options():
    return (
        Option("logits", "bool", None, "the model returns logits: softmax them (default: the model's "
                                       "metadata property logits, else false)"),
        Option("size", "size", None, "input size N or HxW for models whose spatial axes are dynamic"),
        Option("mean", "floats", None, "per-channel mean subtracted from [0, 1] inputs"),
        Option("std", "floats", None, "per-channel std dividing the inputs after the mean"),
    )


class OnnxAdapter(ClassifierAdapter):
    name = "onnx"
    schemes = ("onnx",)
    summary = "ONNX model through ONNX Runtime (black-box): onnx:model.onnx[#logits=1] (extra: onnx)"

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        base, raw = split_options(spec)
        opts = resolve_options(spec, raw, onnx_options())
        path = Path(base.split(":", 1)[1]).expanduser()
        if not path.is_file():
            raise UsageError(f"classifier {spec}: {path}: no such file")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError(
                f"classifier {spec}: ONNX Runtime is not installed; install it with pip install 'cfx[onnx]'"
            ) from None
        return OnnxClassifier(path, spec, options, opts)


class OnnxClassifier(Classifier):
    def __init__(self, path: Path, spec: str, options: ClassifierOptions, opts: dict) -> None:
        import onnxruntime as ort

        self.spec = spec
        self.calls = 0
        providers = ["CPUExecutionProvider"]
        if options.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            idx = options.device.split(":", 1)[1] if ":" in options.device else "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(idx)}))
        so = ort.SessionOptions()
        so.log_severity_level = 3  # warnings from the runtime are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            why = f"classifier {spec}: {path}: not a loadable ONNX model ({str(exc)[:200]})"
            raise UsageError(why) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UsageError(f"classifier {spec}: the model has {len(inputs)} inputs; cfx feeds one image "
                             "tensor")
        inp = inputs[0]
        self.input_name = inp.name
        self.dtype = {"tensor(float)": "float32", "tensor(float16)": "float16",
                      "tensor(double)": "float64"}.get(inp.type)
        if self.dtype is None:
            raise UsageError(f"classifier {spec}: input {inp.name!r} has type {inp.type}; expected float")
        shape = list(inp.shape)
        if len(shape) != 4:
            raise UsageError(f"classifier {spec}: input {inp.name!r} has shape {shape}; expected 4-D images")
        if shape[1] == 3:
            self.layout, hw = "NCHW", shape[2:4]
        elif shape[3] == 3:
            self.layout, hw = "NHWC", shape[1:3]
        else:
            raise UsageError(f"classifier {spec}: input {inp.name!r} has shape {shape}; expected 3 channels "
                             "(NCHW or NHWC)")
        fixed = tuple(hw) if all(isinstance(v, int) and v > 0 for v in hw) else None
        if opts["size"] and fixed and tuple(opts["size"]) != fixed:
            raise UsageError(f"classifier {spec}: #size={opts['size'][0]}x{opts['size'][1]} contradicts the "
                             f"model's input size {fixed[0]}x{fixed[1]}")
        self.input_size = fixed or opts["size"]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        logits = opts["logits"]
        if logits is None:
            logits = options.logits or str(meta.get("logits", "")).lower() in ("1", "true", "yes")
        self.returns_logits = bool(logits)
        self.mean, self.std = opts["mean"], opts["std"]
        labels = options.labels or _labels_from_metadata(meta.get("labels"), spec)
        if not labels:
            labels = [str(i) for i in range(self._probe_classes())]
        self.labels = list(labels)

    def _probe_classes(self) -> int:
        out = self._run_raw(_zeros(self.input_size or (224, 224)))
        return int(out.shape[1])

    def _run_raw(self, x):
        """(N, 3, H, W) float32 numpy in [0, 1] → the model's (N, K) output as numpy."""
        import numpy as np

        if self.mean is not None or self.std is not None:
            mean = np.asarray(self.mean or (0.0, 0.0, 0.0), dtype=np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(self.std or (1.0, 1.0, 1.0), dtype=np.float32).reshape(1, 3, 1, 1)
            x = (x - mean) / std
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x, dtype=self.dtype)
        step = self.fixed_batch or len(x)
        outs = []
        for i in range(0, len(x), step):
            try:
                outs.append(self.session.run(None, {self.input_name: x[i : i + step]})[0])
            except Exception as exc:
                raise ClassifierError(f"{self.spec}: ONNX Runtime failed: {str(exc)[:300]}") from None
        out = np.concatenate(outs).astype(np.float64)
        if out.ndim != 2:
            raise ClassifierError(f"{self.spec}: the model returned shape {out.shape}; expected (N, K)")
        return out

    def predict_proba(self, images):
        import torch

        x = resize_batch(images, self.input_size)
        if len(x) == 0:
            return torch.zeros(0, len(self.labels))
        out = torch.from_numpy(self._run_raw(x.numpy()))
        self.calls += len(x)
        if self.returns_logits:
            out = torch.softmax(out, dim=1)
        return check_probabilities(out.float(), len(x), len(self.labels), self.spec)

    def scores(self, images):
        import torch

        x = resize_batch(images, self.input_size)
        out = torch.from_numpy(self._run_raw(x.numpy())).float()
        self.calls += len(x)
        return out if self.returns_logits else torch.logit(out, eps=1e-6)  # #logits=0: sigmoid probabilities


def _zeros(size):
    import numpy as np

    return np.zeros((1, 3, size[0], size[1]), dtype=np.float32)


def _labels_from_metadata(value: str | None, spec: str) -> list[str] | None:
    if not value:
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except ValueError:
            raise UsageError(f"classifier {spec}: metadata property labels is not valid JSON") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise UsageError(f"classifier {spec}: metadata property labels must be a list of strings")
        return labels
    sep = "\n" if "\n" in text else ","
    return [x.strip() for x in text.split(sep) if x.strip()]


@hookimpl
def register_classifier_adapters(register):
    register(OnnxAdapter)
