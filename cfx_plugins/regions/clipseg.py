"""``--region clipseg:PROMPT``: the region a text prompt names, segmented by CLIPSeg (Lüddecke & Ecker, CVPR 2022).

RCSB §4 takes its regions from a text-prompted segmenter (LangSAM); this source does the same with
``transformers``' ``CLIPSegForImageSegmentation`` (``CIDAS/clipseg-rd64-refined`` unless
``--set region_model=FOLDER_OR_HUB_ID``; from a local folder or the Hugging Face cache, never downloaded with
``HF_HUB_OFFLINE=1``). Per input: the library's own ``CLIPSegProcessor`` prepares the image as the explainer sees it
and the prompt, the model's per-pixel logits go through a sigmoid, are resized (bilinear) to the explainer's size
and thresholded: ``mask = sigmoid > region_threshold`` (default 0.5: the decision boundary of the model's
binary cross-entropy training, and SAM's mask threshold that LangSAM inherits; the CLIPSeg authors also report
IoU at 0.3, which gives larger regions). Needs no classifier, so it works with every method that accepts a region.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cfx_cli.errors import InputError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.hub import PROCESSOR_CONFIGS, TRANSFORMERS_FILES, TRANSFORMERS_WEIGHTS, missing_in, resolve_hub_folder
from cfx_cli.quiet import quiet_loaded_libraries
from cfx_cli.regions import RegionSource

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"
DEFAULT_THRESHOLD = 0.5
NEEDED = [("config.json",), PROCESSOR_CONFIGS, TRANSFORMERS_WEIGHTS, ("tokenizer.json", "vocab.json")]


class ClipSegRegion(RegionSource):
    scheme = "clipseg"
    summary = (f"CLIPSeg segmentation of a text prompt (clipseg:the mouth), sigmoid > region_threshold "
               f"({DEFAULT_THRESHOLD}); model: region_model ({DEFAULT_MODEL})")
    option_defaults: ClassVar[dict[str, Any]] = {"region_threshold": DEFAULT_THRESHOLD, "region_model": DEFAULT_MODEL}

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None) -> None:
        opts = {**self.option_defaults, **{k: v for k, v in (options or {}).items() if v is not None}}
        super().__init__(arg, opts)
        self.spec = f"clipseg:{arg}"
        self.prompt = arg.strip()
        if not self.prompt:
            raise UsageError('--region clipseg:PROMPT: give the text of the region, e.g. --region "clipseg:the mouth"')
        try:
            self.threshold = float(opts["region_threshold"])
        except (TypeError, ValueError):
            raise UsageError(f"--set region_threshold={opts['region_threshold']}: expected a number in (0, 1)") \
                from None
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"--set region_threshold={self.threshold}: must be in (0, 1) (CLIPSeg's sigmoid output "
                             "is thresholded)")
        self.model_ref = str(opts["region_model"])
        self.options = {"region_threshold": self.threshold, "region_model": self.model_ref}
        self._loaded: tuple | None = None
        self.device = "cpu"

    def check(self, classifier: Any) -> None:
        """Load the segmenter before any work (on the classifier's device), so absent weights are one line, not
        one error per input."""
        self.device = getattr(classifier, "device", None) or "cpu"
        self._load()

    def _load(self):
        if self._loaded is not None:
            return self._loaded
        label = f"--region {self.spec}"
        how = "pass a local folder with --set region_model=FOLDER"
        folder = resolve_hub_folder(label, self.model_ref, "the CLIPSeg model", TRANSFORMERS_FILES, how_else=how)
        missing = missing_in(folder, NEEDED)
        if missing:
            raise UsageError(f"{label}: {folder} has no {', '.join(missing)} (a CLIPSeg model saved with "
                             f"save_pretrained, with its CLIPSegProcessor; the default is published at "
                             f"https://huggingface.co/{DEFAULT_MODEL})")
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        quiet_loaded_libraries()
        try:
            processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
            model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True).eval().to(self.device)
        except Exception as exc:
            first = " ".join(str(exc).split())[:300]
            raise UsageError(f"{label}: cannot load the CLIPSeg model in {folder} ({type(exc).__name__}: {first})") \
                from None
        text = processor(text=[self.prompt], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():  # the prompt's embedding, once per run
            mask = text.get("attention_mask")
            cond = model.get_conditional_embeddings(batch_size=1, input_ids=text["input_ids"].to(self.device),
                                                    attention_mask=None if mask is None else mask.to(self.device))
        self._loaded = (processor, model, cond)
        return self._loaded

    def probabilities(self, image, size: tuple[int, int]):
        """sigmoid(CLIPSeg logits) for the (H, W, 3) float image, bilinearly resized to ``size`` (H, W)."""
        import numpy as np
        import torch
        from PIL import Image

        from cfx_cli.images import (
            resize_images,  # numpy at its top: lazy like torch
            to_uint8,
        )

        processor, model, cond = self._load()
        pixels = processor.image_processor(images=[Image.fromarray(to_uint8(image))], return_tensors="pt")
        with torch.no_grad():
            logits = model(pixel_values=pixels["pixel_values"].to(self.device), conditional_embeddings=cond).logits
        logits = logits.reshape(1, 1, *logits.shape[-2:]).float()
        probs = resize_images(torch.sigmoid(logits), tuple(size), antialias=False)
        return probs[0, 0].cpu().numpy().astype(np.float64)

    def mask_for(self, item, size, image=None, classifier=None):
        import numpy as np

        if image is None:
            raise UsageError(f"--region {self.spec} needs the image")
        if self._loaded is None and classifier is not None:  # a worker that built its own copy (Ray)
            self.device = getattr(classifier, "device", None) or "cpu"
        mask = (self.probabilities(image, size) > self.threshold).astype(np.float32)
        if not mask.any():
            raise InputError(f"{item.path}: CLIPSeg finds no pixel of {self.prompt!r} above region_threshold "
                             f"{self.threshold} (an empty region); lower it with --set region_threshold= or "
                             "reword the prompt")
        return mask


@hookimpl
def register_region_sources(register):
    register(ClipSegRegion)
