"""HiT, the Hindered Transformer (Jeanneret, thesis ch. 6; CVPRW 2025): architecture and exact decomposition.

A ViT whose CLS token is updated **only** by multi-head attention with the CLS as the single query and the patch
tokens as keys/values, while the MLPs update **only** the patch tokens (thesis eq. 6.7)::

    x_{l+1}[0]  = x_l[0]  + MHA(LN_1(x_l[0]), LN_1(x_l[1:]))
    x_{l+1}[1:] = x_l[1:] + MLP(LN_2(x_l[1:]))

No patch token ever sees another, so each keeps purely local information, and the final CLS is a sum of one
vector per (layer, patch) plus the biases and the initial CLS (eq. 6.8); the final LayerNorm and the linear head
distribute over that sum exactly (the mean and variance are those of the whole CLS). :meth:`HiT.decompose`
returns those terms, so the per-patch map, the per-layer split and the logits are one tensor summed different
ways. The spatial variant (the authors' ``hit`` configs hit-s / hit-b) 2×2-average-pools the patch grid between
stages; a pooled token's terms are spread evenly over the patches it covers (the authors' ``forward_cam``).

Module and parameter names are those of the authors' ``core/model/IT.py`` (``SpatialInterpretableTransformer``
for ``hit``, ``InterpretableVisualTransformer`` for ``hit-no-pool``), so their checkpoints load with
``load_state_dict``. The model takes **normalised** images (the authors' ImageNet mean/std), like theirs; cfx's
adapter puts the normalisation in front. Written for cfx from the thesis and the authors' module layout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

#: the authors' LayerNorm ε (``partial(nn.LayerNorm, eps=1e-6)``)
LN_EPS = 1e-6


@dataclass(frozen=True)
class HiTConfig:
    """Hyperparameters, named as in the authors' YAML configs (``model.params``)."""

    image_size: int = 224
    patch_size: int = 8
    num_heads: int = 6
    mlp_ratio: float = 4
    num_classes: int = 1000
    #: layers per stage and token width per stage; a single stage without pooling is ``hit-no-pool``
    blocks: tuple[int, ...] = (4, 4, 4)
    block_dims: tuple[int, ...] = (384, 384, 384)
    #: True: the spatial HiT (``name: hit``), 2×2 average pooling of the patch grid before every stage but the
    #: first; False: ``name: hit-no-pool`` (one stage; its module names differ, as in the authors' code)
    pool: bool = True
    use_pos_tokens: bool = True
    ln_at_the_end: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.block_dims) or not self.blocks:
            raise ValueError(f"blocks {self.blocks} and block_dims {self.block_dims} must have the same length")
        if not self.pool and len(self.blocks) != 1:
            raise ValueError("hit-no-pool has one stage: give num_layers and hidden_dim")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        grid = self.image_size // self.patch_size
        if self.pool and grid % (2 ** (len(self.blocks) - 1)):
            raise ValueError(f"a {grid}×{grid} patch grid cannot be 2×2-pooled {len(self.blocks) - 1} times")
        for dim in self.block_dims:
            if dim % self.num_heads:
                raise ValueError(f"token width {dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_layers(self) -> int:
        return sum(self.blocks)

    @property
    def grid(self) -> int:
        """Patches per side of the input grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_authors(cls, name: str, params: dict) -> HiTConfig:
        """From the authors' config (``model.name`` and ``model.params`` of configs/hit-*.yaml)."""
        params = dict(params)
        version = params.pop("block_version", "hit")
        if version != "hit":
            raise ValueError(f"block_version {version!r}: only the HiT block ('hit') is implemented")
        if name == "hit-no-pool":
            for key in ("blocks", "block_dims"):
                if key in params:
                    raise ValueError(f"hit-no-pool takes num_layers and hidden_dim, not {key}")
            params["blocks"] = (int(params.pop("num_layers", 12)),)
            params["block_dims"] = (int(params.pop("hidden_dim", 384)),)
            params["pool"] = False
        elif name == "hit":
            for key in ("num_layers", "hidden_dim"):
                if key in params:
                    raise ValueError(f"the spatial hit takes blocks and block_dims, not {key}")
            params["pool"] = True
        else:
            raise ValueError(f"model name {name!r}: expected hit or hit-no-pool")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown HiT parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("blocks", "block_dims"):
            if key in params:
                params[key] = tuple(int(v) for v in params[key])
        return cls(**params)

    def to_authors(self) -> dict:
        """The authors' ``model`` section: ``{"name": ..., "params": {...}}``."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("blocks", "block_dims",
                                                                                         "pool")}
        if self.pool:
            params.update(blocks=list(self.blocks), block_dims=list(self.block_dims))
        else:
            params.update(num_layers=self.blocks[0], hidden_dim=self.block_dims[0])
        params["block_version"] = "hit"
        return {"name": "hit" if self.pool else "hit-no-pool", "params": params}


class DropPath(nn.Module):
    """Stochastic depth per sample (training only); has no parameters."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MLPBlock(nn.Sequential):
    """torchvision's ViT MLP layout (``mlp.0`` and ``mlp.3`` are the linear layers)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


@dataclass
class Attended:
    """One HiT attention step: the CLS update, the head-averaged attention and the per-patch contributions."""

    update: torch.Tensor  # (B, 1, D): MHA output added to the CLS
    attention: torch.Tensor  # (B, S): CLS → patch attention, mean over heads
    contributions: torch.Tensor | None  # (B, S, D): patch j's term Σ_h a_hj v_hj W_o^h (eq. 6.5), bias excluded


@dataclass
class Trace:
    """What :meth:`HiT.trace` records: (stage, pooling factor, block, step) per layer, the pooling per stage,
    the final CLS and the initial CLS in the final width (both (B, D))."""

    layers: list[tuple[int, int, HiTBlock, Attended]] = field(default_factory=list)
    pools: list[PoolingTokens | None] = field(default_factory=list)
    cls: torch.Tensor | None = None
    initial: torch.Tensor | None = None


class HiTBlock(nn.Module):
    """The HiT block (eq. 6.7), with the authors' names: ``ln_1``, ``self_attention``, ``ln_2``, ``mlp``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, attention_dropout: float,
                 mlp_dropout: float, drop_path: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        # only its parameters are used (the authors' names in_proj_weight, out_proj...); the attention of one
        # query is computed in :meth:`attend`, which also yields the per-patch terms
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout) if drop_path > 0 else nn.Identity()  # as the authors wire it
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPBlock(dim, int(mlp_ratio * dim), mlp_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, cls: torch.Tensor, x: torch.Tensor, per_patch: bool = False) -> Attended:
        """MHA with the CLS (B, 1, D) as the only query over the patches x (B, S, D)."""
        b, s, d = x.shape
        h = self.num_heads
        mha = self.self_attention
        # one LayerNorm call over [CLS; patches] (it is per token): a hook on ln_1 sees (B, 1 + S, D), the ViT
        # token layout that Grad-CAM reads
        normed = self.ln_1(torch.cat([cls, x], dim=1))
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q = F.linear(normed[:, :1], w_q, b_q).view(b, 1, h, d // h).transpose(1, 2)  # (B, H, 1, d_h)
        k = F.linear(normed[:, 1:], w_k, b_k).view(b, s, h, d // h).transpose(1, 2)  # (B, H, S, d_h)
        v = F.linear(normed[:, 1:], w_v, b_v).view(b, s, h, d // h).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)  # (B, H, 1, S)
        weights = F.dropout(attn, p=mha.dropout, training=self.training)
        out = mha.out_proj
        contributions = None
        if per_patch:
            # eq. 6.5: concatenating the heads then W_o equals Σ_h (a_h v_h) W_o^h, one vector per patch
            per = (weights.transpose(-2, -1) * v).permute(0, 2, 1, 3).reshape(b, s, d)  # (B, S, D)
            contributions = F.linear(per, out.weight)
            update = contributions.sum(dim=1, keepdim=True) + out.bias
        else:
            mixed = (weights @ v).transpose(1, 2).reshape(b, 1, d)
            update = F.linear(mixed, out.weight, out.bias)
        return Attended(update, attn[:, :, 0].mean(dim=1), contributions)

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches, CLS) → (patches, CLS) after this layer."""
        update = self.attend(cls, x).update
        cls = cls + self.drop_path(self.dropout(update))
        x = x + self.drop_path(self.dropout(self.mlp(self.ln_2(x))))
        return x, cls


class PoolingTokens(nn.Module):
    """2×2 average pooling of the patch grid (factor 1: none) and a bias-free width change (``linear``)."""

    def __init__(self, factor: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.factor = factor
        self.avg_pool = nn.AvgPool2d(kernel_size=factor)
        self.linear = nn.Linear(in_dim, out_dim, bias=False) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cls: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.factor > 1:
            b, s, d = x.shape
            x = self.avg_pool(x.transpose(1, 2).reshape(b, d, side, side))
            side = x.shape[-1]
            x = x.reshape(b, d, -1).transpose(1, 2)
        return self.linear(x), self.linear(cls), side


class HiTEncoder(nn.Module):
    """``encoder``: positional embedding, the layers (in stages when pooled) and the final LayerNorm."""

    def __init__(self, config: HiTConfig) -> None:
        super().__init__()
        c = config
        self.pos_embedding = None
        if c.use_pos_tokens:
            self.pos_embedding = nn.Parameter(torch.empty(1, c.grid ** 2 + 1, c.block_dims[0]).normal_(std=0.02))
        self.dropout = nn.Dropout(c.dropout)  # unused, as in the authors' encoder (no parameters)

        def block(dim: int) -> HiTBlock:
            return HiTBlock(dim, c.num_heads, c.mlp_ratio, c.dropout, c.attention_dropout, c.mlp_dropout,
                            c.drop_path)

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if c.pool:
            previous = c.block_dims[0]
            for i, (n, dim) in enumerate(zip(c.blocks, c.block_dims, strict=True)):
                stage: OrderedDict[str, nn.Module] = OrderedDict(pool=PoolingTokens(2 if i else 1, previous, dim))
                for j in range(n):
                    stage[f"encoder_layer_{j}"] = block(dim)
                layers[f"block_{i}"] = nn.Sequential(stage)
                previous = dim
        else:
            for j in range(c.blocks[0]):
                layers[f"encoder_layer_{j}"] = block(c.block_dims[0])
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(c.block_dims[-1], eps=LN_EPS) if c.ln_at_the_end else None
        self.pooled = c.pool

    def stages(self) -> list[tuple[PoolingTokens | None, list[HiTBlock]]]:
        """(pooling or None, its layers) per stage, in order."""
        if not self.pooled:
            return [(None, list(self.layers))]
        return [(stage.pool, [m for name, m in stage.named_children() if name != "pool"]) for stage in self.layers]


@dataclass
class Decomposition:
    """The exact split of a HiT prediction into one term per (layer, patch).

    ``terms[b, l, p]`` (a D-vector) is layer l's share of the final, normalised CLS token that comes from input
    patch p (row-major on the ``grid``): its attention contribution (spread evenly over the patches a pooled
    token covers), plus 1/P of the layer's output bias, plus 1/(L·P) of the initial CLS (class token + its
    positional embedding), with the final LayerNorm distributed (its mean and bias 1/(L·P) per term, the
    whole CLS's standard deviation). So ``terms.sum((1, 2))`` is the normalised CLS and
    ``head(terms).sum((1, 2)) + head.bias`` the logits. ``raw`` holds the same terms before the LayerNorm,
    without the initial-CLS share (``initial``), so ``initial + raw[:, :l+1].sum((1, 2))`` is the CLS after
    layer l when no stage changes the width.
    """

    logits: torch.Tensor  # (B, K) of this forward pass
    terms: torch.Tensor  # (B, L, P, D)
    raw: torch.Tensor  # (B, L, P, D)
    initial: torch.Tensor  # (B, D): the CLS before the first layer, in the last stage's width
    cls: torch.Tensor  # (B, D): the CLS after the last layer, before the final LayerNorm
    grid: tuple[int, int]
    weight: torch.Tensor  # (K, D) of the linear head
    bias: torch.Tensor  # (K,)

    def class_terms(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logit terms: (B, L, P, K) for every class, or (B, L, P) for ``classes[b]`` of each image."""
        if classes is None:
            return F.linear(self.terms, self.weight)
        w = self.weight[classes.to(self.weight.device).long()]  # (B, D)
        return torch.einsum("blpd,bd->blp", self.terms, w)

    def patch_map(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The HiT saliency map: (B, K, h, w), or (B, h, w) for ``classes``; sums (+ bias) to the logits."""
        t = self.class_terms(classes).sum(dim=1)
        if classes is None:
            return t.transpose(1, 2).reshape(t.shape[0], -1, *self.grid)
        return t.reshape(t.shape[0], *self.grid)

    def layer_map(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Per-layer logit contributions: (B, K, L), or (B, L) for ``classes``."""
        t = self.class_terms(classes).sum(dim=2)
        return t.transpose(1, 2) if classes is None else t


class HiT(nn.Module):
    """The Hindered Transformer on normalised (B, 3, H, W) images → (B, K) logits."""

    def __init__(self, config: HiTConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.class_token = nn.Parameter(torch.zeros(1, 1, c.block_dims[0]))
        self.encoder = HiTEncoder(c)
        self.conv_proj = nn.Conv2d(3, c.block_dims[0], kernel_size=c.patch_size, stride=c.patch_size)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(c.block_dims[-1], c.num_classes)))
        self.patch_size, self.image_size, self.num_classes = c.patch_size, c.image_size, c.num_classes
        fan_in = 3 * c.patch_size ** 2  # ViT initialisation, as the authors
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (patch tokens (B, P, D) with positions, the initial CLS (B, 1, D))."""
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"HiT expects (B, 3, {self.image_size}, {self.image_size}) images, got "
                             f"{tuple(x.shape)}")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        pos = self.encoder.pos_embedding
        if pos is not None:
            tokens = tokens + pos[:, 1:]
            cls = cls + pos[:, :1]
        return tokens, cls

    def head_logits(self, cls: torch.Tensor) -> torch.Tensor:
        ln = self.encoder.ln
        return self.heads(ln(cls) if ln is not None else cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, cls = self.embed(x)
        side = self.config.grid
        for pool, blocks in self.encoder.stages():
            if pool is not None:
                tokens, cls, side = pool(tokens, cls, side)
            for blk in blocks:
                tokens, cls = blk(tokens, cls)
        return self.head_logits(cls[:, 0])

    def trace(self, x: torch.Tensor, per_patch: bool) -> Trace:
        """Run the layers on normalised images, keeping each layer's :class:`Attended` step."""
        tokens, cls = self.embed(x)
        initial = cls
        side = full = self.config.grid
        trace = Trace()
        for stage, (pool, blocks) in enumerate(self.encoder.stages()):
            if pool is not None:
                tokens, cls, side = pool(tokens, cls, side)
                initial = pool.linear(initial)
            trace.pools.append(pool)
            for blk in blocks:
                att = blk.attend(cls, tokens, per_patch=per_patch)
                trace.layers.append((stage, full // side, blk, att))
                cls = cls + att.update
                tokens = tokens + blk.mlp(blk.ln_2(tokens))
        trace.cls, trace.initial = cls[:, 0], initial[:, 0]
        return trace

    @staticmethod
    def _to_grid(values: torch.Tensor, factor: int) -> torch.Tensor:
        """(B, S, C) on a pooled grid → (B, P, C) on the input grid, each value spread evenly (÷ factor²)."""
        if factor == 1:
            return values
        b, s, c = values.shape
        side = math.isqrt(s)
        g = values.transpose(1, 2).reshape(b, c, side, side)
        g = g.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor ** 2
        return g.reshape(b, c, -1).transpose(1, 2)

    def decompose(self, x: torch.Tensor) -> Decomposition:
        """The exact per-(layer, patch) decomposition of the prediction on normalised images ``x``."""
        if self.training:
            raise RuntimeError("HiT.decompose needs eval mode (dropout would break the decomposition)")
        trace = self.trace(x, per_patch=True)
        p = self.config.grid ** 2
        raw: list[torch.Tensor] = []
        at = 0
        for stage, factor, blk, att in trace.layers:
            while at < stage:  # a width change maps every earlier term (the map is linear, without bias)
                at += 1
                raw = [trace.pools[at].linear(t) for t in raw]
            raw.append(self._to_grid(att.contributions, factor) + blk.self_attention.out_proj.bias / p)
        cls, initial = trace.cls, trace.initial
        r = torch.stack(raw, dim=1)  # (B, L, P, D)
        n_terms = r.shape[1] * r.shape[2]
        terms = r + initial[:, None, None] / n_terms
        ln = self.encoder.ln
        if ln is not None:
            mean = cls.mean(dim=-1)[:, None, None, None]
            std = (cls.var(dim=-1, unbiased=False) + ln.eps).sqrt()[:, None, None, None]
            terms = (terms - mean / n_terms) / std * ln.weight + ln.bias / n_terms
        head = self.heads.head
        return Decomposition(logits=self.head_logits(cls), terms=terms, raw=r, initial=initial, cls=cls,
                             grid=(self.config.grid, self.config.grid), weight=head.weight, bias=head.bias)

    def rollout(self, x: torch.Tensor) -> torch.Tensor:
        """The thesis' "adapted rollout": CLS → patch attention averaged over heads and layers (HiT has no
        patch-to-patch attention, so the rollout matrix reduces to that), on the input grid: (B, h, w). A pooled
        token's attention is spread evenly over its patches."""
        trace = self.trace(x, per_patch=False)
        total = sum(self._to_grid(att.attention[:, :, None], factor)[:, :, 0] for _, factor, _, att in trace.layers)
        total = total / len(trace.layers)
        side = self.config.grid
        return total.reshape(total.shape[0], side, side)
