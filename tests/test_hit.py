"""HiT (thesis ch. 6): the exact decomposition, parity with the authors' model code, the demo model, the adapter,
``--region hit`` and the insertion/deletion metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cfx_plugins.classifiers.hit.model import HiT, HiTConfig

FIXTURE = Path(__file__).parent / "fixtures" / "hit-ref"

CONFIGS = {
    "pooled, width 8→12→16": HiTConfig(image_size=32, patch_size=4, num_heads=2, num_classes=5, blocks=(2, 1, 2),
                                       block_dims=(8, 12, 16)),
    "pooled, one width": HiTConfig(image_size=16, patch_size=2, num_heads=4, num_classes=3, blocks=(2, 2, 1),
                                   block_dims=(16, 16, 16)),
    "no pool": HiTConfig(image_size=16, patch_size=4, num_heads=3, num_classes=4, blocks=(4,), block_dims=(12,),
                         pool=False),
    "no positions, no final LN": HiTConfig(image_size=16, patch_size=4, num_heads=2, num_classes=6, blocks=(2, 2),
                                           block_dims=(8, 8), use_pos_tokens=False, ln_at_the_end=False),
}


def _random_model(config: HiTConfig, seed: int = 0) -> HiT:
    torch.manual_seed(seed)
    model = HiT(config).eval()
    with torch.no_grad():  # perturb everything: the zero-initialised head and class token would hide terms
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decomposition_sums_to_the_logits_per_patch_and_per_layer(name):
    config = CONFIGS[name]
    model = _random_model(config)
    x = torch.randn(5, 3, config.image_size, config.image_size)
    with torch.no_grad():
        logits = model(x)
        d = model.decompose(x)
        assert d.terms.shape == (5, config.num_layers, config.grid ** 2, config.block_dims[-1])
        assert (d.logits - logits).abs().max() < 1e-5
        patch = d.patch_map()
        assert patch.shape == (5, config.num_classes, config.grid, config.grid)
        assert (patch.sum((2, 3)) + d.bias - logits).abs().max() < 1e-5
        layer = d.layer_map()
        assert layer.shape == (5, config.num_classes, config.num_layers)
        assert (layer.sum(2) + d.bias - logits).abs().max() < 1e-5
        # every (layer, patch) term at once, and the class-selected shortcut
        assert (d.class_terms().sum((1, 2)) + d.bias - logits).abs().max() < 1e-5
        cls = logits.argmax(1)
        assert torch.allclose(d.patch_map(cls), patch[torch.arange(5), cls], atol=1e-6)
        assert torch.allclose(d.layer_map(cls), layer[torch.arange(5), cls], atol=1e-6)
        # the terms are of the normalised CLS token itself
        ln = model.encoder.ln
        final = ln(d.cls) if ln is not None else d.cls
        assert (d.terms.sum((1, 2)) - final).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["pooled, one width", "no pool"])
def test_the_cls_after_every_layer_is_the_sum_of_the_earlier_terms(name):
    """Each layer split of the residual stream: CLS after layer l = initial CLS + Σ_{l' ≤ l} Σ_p raw[l', p]."""
    config = CONFIGS[name]
    model = _random_model(config, seed=1)
    x = torch.randn(3, 3, config.image_size, config.image_size)
    seen = []
    blocks = [blk for _, layers in model.encoder.stages() for blk in layers]
    hooks = [blk.register_forward_hook(lambda _m, _i, out: seen.append(out[1][:, 0])) for blk in blocks]
    with torch.no_grad():
        model(x)
        d = model.decompose(x)
    for h in hooks:
        h.remove()
    assert len(seen) == config.num_layers
    for layer, cls in enumerate(seen):
        partial = d.initial + d.raw[:, : layer + 1].sum((1, 2))
        assert (partial - cls).abs().max() < 1e-5, layer


def test_rollout_is_the_mean_attention_and_sums_to_one():
    config = CONFIGS["pooled, width 8→12→16"]
    model = _random_model(config)
    with torch.no_grad():
        roll = model.rollout(torch.randn(2, 3, 32, 32))
    assert roll.shape == (2, config.grid, config.grid)
    assert torch.allclose(roll.sum((1, 2)), torch.ones(2), atol=1e-5)  # each layer's attention sums to 1


def test_config_from_the_authors_yaml_sections():
    c = HiTConfig.from_authors("hit", {"image_size": 224, "blocks": [4, 4, 4], "num_heads": 6,
                                       "block_dims": [384, 384, 384], "mlp_ratio": 4, "num_classes": 1000,
                                       "patch_size": 8, "use_pos_tokens": True, "block_version": "hit",
                                       "attention_dropout": 0.2})
    assert c.num_layers == 12 and c.grid == 28 and c.pool
    assert HiTConfig.from_authors(**c.to_authors()) == c
    flat = HiTConfig.from_authors("hit-no-pool", {"num_layers": 12, "hidden_dim": 384, "patch_size": 16})
    assert flat.blocks == (12,) and not flat.pool
    with pytest.raises(ValueError, match="block_version"):
        HiTConfig.from_authors("hit", {"block_version": "vit"})
    with pytest.raises(ValueError, match="unknown HiT parameter 'depth'"):
        HiTConfig.from_authors("hit", {"depth": 3})
    with pytest.raises(ValueError, match="pooled"):
        HiTConfig(image_size=24, patch_size=4, blocks=(1, 1, 1), block_dims=(8, 8, 8), num_heads=2)
    model = HiT(CONFIGS["no pool"]).eval()
    with pytest.raises(ValueError, match="expects"):
        model(torch.zeros(1, 3, 8, 8))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.decompose(torch.zeros(1, 3, 16, 16))


# -- parity with the authors' code (fixture written by scripts/crosscheck_hit_reference.py) ----------------------
def _fixture():
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE / "hit-ref.json").read_text())
    return meta, load_file(str(FIXTURE / "hit-ref.safetensors"))


@pytest.mark.parametrize("tag", ["pool-wide", "pool-layers", "no-pool"])
def test_parity_with_the_authors_model_code(tag):
    meta, tensors = _fixture()
    entry = meta["configs"][tag]
    model = HiT(HiTConfig.from_authors(entry["model"]["name"], entry["model"]["params"])).eval()
    prefix = f"{tag}/state/"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)  # the authors' parameter names, unchanged
    x, ref = tensors[f"{tag}/input"], {k.split("/")[-1]: v for k, v in tensors.items() if k.startswith(f"{tag}/ref/")}
    with torch.no_grad():
        d = model.decompose(x)
        assert (model(x) - ref["logits"]).abs().max() <= 1e-5
        assert (d.logits - ref["logits"]).abs().max() <= 1e-5
        assert (d.patch_map() - ref["cam"]).abs().max() <= 1e-5  # forward_cam, without the head bias
        roll = ref["rollout"] / (model.config.num_layers if model.config.pool else 1)  # theirs sums when pooled
        assert (model.rollout(x) - roll).abs().max() <= 1e-5
        layer_gap = float((d.layer_map() - ref["cam_layer"]).abs().max())
    if entry["exact_layer_map"]:
        assert layer_gap <= 1e-5
    else:  # their spatial forward_cam_layer divides the LayerNorm mean/bias by P, not by the number of terms
        assert layer_gap > 1e-3
        assert (ref["cam_layer_logits"] - ref["logits"]).abs().max() > 1e-3
