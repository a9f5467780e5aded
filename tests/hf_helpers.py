"""Tiny random transformers models built offline from configs and saved with ``save_pretrained`` (no hub access):
image classifiers for ``hf:`` and a CLIPSeg for ``--region clipseg:``."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO

DEMO_TOKENIZER = REPO / "cfx_cli" / "demo" / "models" / "latent" / "tokenizer"
LABELS = {i: f"digit {i}" for i in range(10)}


def _labels() -> dict:
    return {"num_labels": 10, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}


def make_vit(folder: Path, image_size: int = 16, processor_size: int = 16, seed: int = 0, processor=None,
             **config) -> Path:
    """A 2-layer ViT (hidden 32, 2 heads, patch 4) with a ViTImageProcessor resizing to ``processor_size``, or
    ``processor`` (another image processor, e.g. one that centre-crops)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, **_labels(), **config)
    ViTForImageClassification(cfg).save_pretrained(folder)
    (processor or ViTImageProcessor(size={"height": processor_size, "width": processor_size})).save_pretrained(folder)
    return folder


def make_resnet(folder: Path, shortest_edge: int = 16, crop_pct: float = 1.0, seed: int = 0) -> Path:
    """A 2-stage ResNet (widths 8, 16) with the ConvNextImageProcessor the hub's ResNets use (bicubic, crop_pct)."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **_labels())
    ResNetForImageClassification(cfg).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": shortest_edge}, crop_pct=crop_pct,
                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def make_clipseg(folder: Path, seed: int = 0) -> Path:
    """A CLIPSeg with 2-layer text and vision towers (hidden 32, 32×32 input, patch 8), the demo's CLIP tokenizer and
    a ViTImageProcessor at 32×32 with ImageNet statistics (as CIDAS/clipseg-rd64-refined, at 352)."""
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(DEMO_TOKENIZER)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    cfg = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16, extract_layers=[0, 1],
                        reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    CLIPSegForImageSegmentation(cfg).save_pretrained(folder)
    images = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                               image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder
