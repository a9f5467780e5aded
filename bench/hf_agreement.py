"""How close ``hf:`` classifiers come to the library's own processor + model (docs/classifiers/hf.md's table).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/hf_agreement.py

Builds the tiny random models of ``tests/hf_helpers.py`` (seed 0) offline in a temporary folder and prints, per
model and processor, max |Δp| between cfx's probabilities and ``processor(images=PIL) → model(...).softmax`` on the
16 demo digits, and the load-time check's difference (in 8-bit levels) on its smooth test image.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_helpers import make_resnet, make_vit  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification, BitImageProcessor, DeiTImageProcessor  # noqa: E402

from cfx_cli.classifiers import ClassifierOptions, load_classifier  # noqa: E402
from cfx_cli.demo import IMAGES_DIR  # noqa: E402
from cfx_cli.images import decode  # noqa: E402
from cfx_plugins.classifiers.hf import check_against_processor  # noqa: E402

DEIT = DeiTImageProcessor(size={"height": 20, "width": 20}, crop_size={"height": 16, "width": 16})
BIT = BitImageProcessor(size={"shortest_edge": 18}, crop_size={"height": 16, "width": 16})
CASES = [
    ("ViT 16, size 16×16", "none", lambda d: make_vit(d)),
    ("ResNet, shortest_edge 16, crop_pct 1.0", "none", lambda d: make_resnet(d, crop_pct=1.0)),
    ("ViT 32, size 32×32", "bilinear 16 → 32", lambda d: make_vit(d, image_size=32, processor_size=32)),
    ("ViT 224, size 224×224", "bilinear 16 → 224", lambda d: make_vit(d, image_size=224, processor_size=224)),
    ("ViT 16, DeiT processor 20×20, crop 16", "bicubic 16 → 20, crop 16", lambda d: make_vit(d, processor=DEIT)),
    ("ViT 16, BiT processor shortest_edge 18, crop 16", "bicubic 16 → 18, crop 16",
     lambda d: make_vit(d, processor=BIT)),
    ("ResNet, shortest_edge 16, crop_pct 0.875", "bicubic 16 → 18, crop 16", lambda d: make_resnet(d, crop_pct=0.875)),
    ("ResNet, shortest_edge 224, crop_pct 0.875", "bicubic 16 → 256, crop 224",
     lambda d: make_resnet(d, shortest_edge=224, crop_pct=0.875)),
]


def main() -> None:
    paths = sorted(IMAGES_DIR.glob("*.png"))
    pil = [Image.open(p).convert("RGB") for p in paths]
    x = torch.from_numpy(np.stack([decode(p) for p in paths]).transpose(0, 3, 1, 2).copy())
    print("| model and processor | resize | max \\|Δp\\| | load check (levels of 255) |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, resize, build) in enumerate(CASES):
            folder = build(Path(tmp) / str(i))
            processor = AutoImageProcessor.from_pretrained(folder)
            model = AutoModelForImageClassification.from_pretrained(folder).eval()
            with torch.no_grad():
                ref = model(**processor(images=pil, return_tensors="pt")).logits.softmax(-1)
            clf = load_classifier(f"hf:{folder}", ClassifierOptions())
            delta = float((clf.predict_proba(x) - ref).abs().max())
            levels = check_against_processor(clf.module, processor, name, "cpu")
            print(f"| {name} | {resize} | {delta:.2g} | {levels:.2f} |")


if __name__ == "__main__":
    main()
