"""``hf:PATH_OR_HUB_ID``: a Hugging Face ``transformers`` image classifier (white-box).

Loads ``AutoModelForImageClassification`` and its ``AutoImageProcessor`` from a local folder (``save_pretrained``)
or the Hugging Face cache (a hub id ``org/name``; never downloaded when ``HF_HUB_OFFLINE=1``). The processor's
preprocessing — resize (``size``: height/width or shortest edge; ConvNeXT's ``crop_pct`` rule), centre crop,
rescale, normalise — runs in torch inside the differentiable forward, so inputs of any size are classified as the
library would classify them (up to the resize: PIL rounds its resized pixels to 8 bits, torch does not; see
docs/classifiers/hf.md for the measured bound). At load, the torch pipeline is checked against the library's own
processor on a test image, so a processor with a step cfx does not reproduce (a channel flip, an offset) fails in
one line instead of explaining a different model. Labels come from ``config.id2label``; probabilities are the
softmax of the logits (multi-label models: see :data:`MULTI_LABEL_NOTE`). Spec option: ``#revision=REV`` (a
cached branch, tag or commit of a hub id).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.hub import PROCESSOR_CONFIGS, TRANSFORMERS_FILES, TRANSFORMERS_WEIGHTS, missing_in, resolve_hub_folder
from cfx_cli.protocol import Option, resolve_options, split_options
from cfx_cli.quiet import quiet_loaded_libraries
from cfx_cli.whitebox import TorchModuleClassifier

NEEDED = [("config.json",), PROCESSOR_CONFIGS, TRANSFORMERS_WEIGHTS]
#: PIL resampling codes (``resample`` in processor configs) → torch ``interpolate`` modes. Lanczos, box and
#: Hamming have no torch counterpart: antialiased bicubic stands in (the load-time check bounds the difference).
RESAMPLE = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
#: largest difference, in 8-bit pixel levels, between cfx's preprocessing and the processor's on the load-time
#: check image (a smooth image, resized): PIL's 8-bit rounding (≤ 1 level per resize pass) plus filter differences
CHECK_LEVELS = 3.0
MULTI_LABEL_NOTE = ("a multi-label model (problem_type multi_label_classification): cfx reports the softmax of its "
                    "logits (the same ranking and argmax as its per-class sigmoids), not the sigmoids; "
                    "#attribute=NAME explains one of its sigmoid outputs as two classes")


class HFAdapter(ClassifierAdapter):
    name = "hf"
    schemes = ("hf",)
    summary = "Hugging Face transformers image classifier (white-box): hf:FOLDER or hf:ORG/NAME (cached)"
    capabilities = frozenset({"probabilities", "gradients"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        base, raw = split_options(spec)
        opts = resolve_options(spec, raw, (Option("revision", "str", None, "branch, tag or commit of a hub id"),))
        ref = base.split(":", 1)[1]
        if not ref:
            raise UsageError(f"classifier {spec}: expected hf:FOLDER or hf:ORG/NAME")
        folder = resolve_hub_folder(f"classifier hf:{ref}", ref, "the image classifier", TRANSFORMERS_FILES,
                                    revision=opts.get("revision"))
        model, processor = load_pretrained(folder, f"hf:{ref}")
        classifier = HFClassifier(model, processor, spec, options.device)
        if classifier.problem_type == "multi_label_classification" and not options.raw_outputs:
            print(f"note: {spec.split('#', 1)[0]} is {MULTI_LABEL_NOTE}", file=sys.stderr)
        return classifier


def load_pretrained(folder: Path, label: str):
    """(model, image processor) from a local folder, after checking the files each needs exist."""
    missing = missing_in(folder, NEEDED)
    if missing:
        raise UsageError(f"classifier {label}: {folder} has no {', '.join(missing)} (a transformers image "
                         "classifier saved with model.save_pretrained and processor.save_pretrained)")
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    quiet_loaded_libraries()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        archs = [a for a in (config.architectures or []) if a.endswith("ForImageClassification")]
        if config.architectures and not archs:
            raise UsageError(f"classifier {label}: {folder} holds a {', '.join(config.architectures)}, not an "
                             "image classifier (*ForImageClassification)")
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except UsageError:
        raise
    except Exception as exc:  # a bad config, an unknown model type, weights that do not fit
        first = " ".join(str(exc).split())[:300]
        raise UsageError(f"classifier {label}: cannot load {folder} ({type(exc).__name__}: {first})") from None
    return model, processor


# --------------------------------------------------------------------------- the processor, in torch
def preprocessing(processor: Any, label: str) -> dict:
    """The processor's settings as plain data (recorded in run.json), or one line naming what is not supported."""
    size = _as_dict(processor.size) if getattr(processor, "do_resize", False) else None
    if size is not None:
        if not ({"height", "width"} <= set(size) or set(size) == {"shortest_edge"}):
            raise UsageError(f"classifier {label}: its image processor resizes to {size}; cfx reproduces "
                             "size {height, width} or {shortest_edge} only")
    crop = None
    if getattr(processor, "do_center_crop", False) and processor.crop_size:
        crop = _as_dict(processor.crop_size)
        crop = (int(crop["height"]), int(crop["width"]))
    kind = type(processor).__name__.removesuffix("Pil").removesuffix("Fast")
    if kind == "ConvNextImageProcessor" and crop is not None:
        raise UsageError(f"classifier {label}: ConvNextImageProcessor with do_center_crop is not reproduced by cfx")
    normalize = bool(getattr(processor, "do_normalize", False))
    resample = getattr(processor, "resample", None)
    return {
        "processor": kind,
        "size": size,
        "resample": int(resample) if resample is not None else 2,  # transformers' default: bilinear
        # ConvNeXT (also ResNet, RegNet... checkpoints): resize the short edge to size/crop_pct, crop size × size
        "crop_pct": float(getattr(processor, "crop_pct", None) or 224 / 256)
        if kind == "ConvNextImageProcessor" and size else None,
        "crop": crop,
        "scale": float(processor.rescale_factor) * 255.0 if getattr(processor, "do_rescale", False) else 255.0,
        "mean": _three(processor.image_mean) if normalize else None,
        "std": _three(processor.image_std) if normalize else None,
    }


def _three(value: Any) -> list[float]:
    """Per-channel statistics: a list of three, or one number for every channel."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def _as_dict(value: Any) -> dict:
    """A processor's ``size`` / ``crop_size`` (a dict, or transformers 5's ``SizeDict``) without its None keys."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return {k: v for k, v in dict(value or {}).items() if v is not None}


def _short_edge_size(h: int, w: int, short: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: the short edge to ``short``."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def output_plan(prep: dict, h: int, w: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(resize to (H, W) or None, centre crop to (H, W) or None) for an h × w input."""
    size, resize, crop = prep["size"], None, prep["crop"]
    if size is not None:
        if "height" in size:
            resize = (int(size["height"]), int(size["width"]))
        elif prep["crop_pct"] is not None and size["shortest_edge"] < 384:
            s = int(size["shortest_edge"])
            resize, crop = _short_edge_size(h, w, int(s / prep["crop_pct"])), (s, s)
        elif prep["crop_pct"] is not None:
            s = int(size["shortest_edge"])
            resize = (s, s)  # ConvNeXT warps at 384 and above
        else:
            resize = _short_edge_size(h, w, int(size["shortest_edge"]))
    return resize, crop


@functools.cache
def _module_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class HFForward(nn.Module):
        """[0, 1] images (N, 3, H, W) → the model's logits, through the processor's steps in torch."""

        def __init__(self, model: nn.Module, prep: dict) -> None:
            super().__init__()
            self.model = model
            self.prep = prep
            mean = prep["mean"] or [0.0, 0.0, 0.0]
            std = prep["std"] or [1.0, 1.0, 1.0]
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def pixel_values(self, x: torch.Tensor) -> torch.Tensor:
            resize, crop = output_plan(self.prep, int(x.shape[-2]), int(x.shape[-1]))
            if resize is not None and tuple(x.shape[-2:]) != resize:
                mode = RESAMPLE.get(self.prep["resample"], "bilinear")
                x = F.interpolate(x, size=resize, mode=mode, antialias=mode != "nearest-exact",
                                  **({} if mode == "nearest-exact" else {"align_corners": False}))
                x = x.clamp(0.0, 1.0)  # PIL clips to 8 bits (bicubic overshoots)
            if crop is not None:
                x = center_crop(x, crop)
            return (x * self.prep["scale"] - self.mean) / self.std

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=self.pixel_values(x)).logits

    def center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
        """transformers' ``center_crop``: top-left at ((H − h) // 2, (W − w) // 2), zero padding if smaller."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ch, cw = crop
        if ch > h or cw > w:  # zero padding, ⌈margin / 2⌉ before, as transformers
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            top, left = -(-ph // 2), -(-pw // 2)
            x = F.pad(x, (left, pw - left, top, ph - top))
            h, w = int(x.shape[-2]), int(x.shape[-1])
        top, left = (h - ch) // 2, (w - cw) // 2
        return x[..., top:top + ch, left:left + cw]

    return HFForward


class HFClassifier(TorchModuleClassifier):
    """A transformers classifier with its processor in the forward: any input size (``input_size`` is None)."""

    def __init__(self, model, processor, spec: str, device: str = "cpu") -> None:
        label = spec.split("#", 1)[0]
        config = model.config
        if int(config.num_labels) < 2 or config.problem_type == "regression":
            raise UsageError(f"classifier {label}: a regression model (num_labels {config.num_labels}), not a "
                             "classifier")
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        labels = [id2label.get(i, str(i)) for i in range(int(config.num_labels))]
        self.preprocessing = preprocessing(processor, label)
        self.problem_type = config.problem_type or "single_label_classification"
        module = _module_class()(model.float(), self.preprocessing)
        super().__init__(module, labels, None, spec=spec, device=device, returns_logits=True)
        check_against_processor(self.module, processor, label, device)

    def describe(self) -> dict:
        info = super().describe()
        info["preprocessing"] = self.preprocessing
        info["problem_type"] = self.problem_type
        return info


def check_image(h: int, w: int):
    """A smooth uint8 test image (H, W, 3): resizing it is well defined, so a large difference is a wrong step."""
    import numpy as np

    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = [np.sin(2.1 * xx + 1.3 * yy), np.cos(1.7 * xx - 2.3 * yy), np.sin(3.1 * xx * yy + 0.5)]
    return (np.stack(chans, axis=2) * 100 + 128).round().clip(0, 255).astype(np.uint8)


def check_against_processor(module, processor, label: str, device: str) -> float:
    """Run the library's processor and cfx's torch steps on one test image (not square, larger than the model's
    input, so resizes and crops happen); raise one line when they disagree. Returns the difference in 8-bit levels."""
    import numpy as np
    import torch
    from PIL import Image

    prep = module.prep
    nominal = prep["crop"] or (tuple(prep["size"].values())[:2] if prep["size"] else (64, 64))
    h, w = int(nominal[0] * 1.25) + 3, int(nominal[-1] * 1.5) + 5
    img = check_image(h, w)
    try:
        ref = processor(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"].float()
    except Exception as exc:  # a processor that needs more than images
        raise UsageError(f"classifier {label}: its image processor ({prep['processor']}) failed on a test image "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].float().div(255.0).to(device)
    with torch.no_grad():
        ours = module.pixel_values(x).cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        raise UsageError(f"classifier {label}: cfx cannot reproduce its image processor ({prep['processor']}): on "
                         f"a {w}×{h} test image it gives {tuple(ref.shape[-2:])} pixels, cfx {tuple(ours.shape[-2:])}")
    std = module.std.cpu()
    levels = float(((ours - ref).abs() * std / prep["scale"] * 255.0).max())
    if not np.isfinite(levels) or levels > CHECK_LEVELS:
        raise UsageError(f"classifier {label}: cfx cannot reproduce its image processor ({prep['processor']}): on "
                         f"a test image its output differs from the processor's by {levels:.1f} levels of 255 "
                         f"(allowed {CHECK_LEVELS}); use a python: factory with the model's preprocessing")
    return levels


@hookimpl
def register_classifier_adapters(register):
    register(HFAdapter)
