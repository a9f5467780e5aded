"""Class activation maps (ScoreCAM, Grad-CAM) and the key region of ECED's algorithm 1.

ECED (supplement, alg. 1) finds the region a counterfactual may change as
``U = ScoreCAM(I, y, f, l)``, ``M = [u_ij > ξ]``, ``M' = downsample(M)``. This module holds the pieces:

- :func:`score_cam` / :func:`grad_cam`: (N, H, W) maps in [0, 1] at the input's resolution;
- :func:`default_layer`: the layer used when none is named (the last ``Conv2d``, rectified);
- :func:`key_region`: the threshold ``M = U > ξ``;
- :func:`latent_mask`: ``M' = downsample(M)`` to the latent grid of a latent diffusion model.

``module`` may be a ``torch.nn.Module`` taking (N, 3, H, W) inputs, or a white-box cfx classifier
(:class:`cfx_cli.whitebox.TorchModuleClassifier`): then the maps are computed through the classifier's own
``logits`` (its resizing and normalisation), with layers named as in ``classifier.module.named_modules()``.
torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cfx_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

#: latent-mask downsampling rules accepted by :func:`latent_mask`
LATENT_MODES = ("nearest", "any", "majority")


# --------------------------------------------------------------------------------------------- layers
def _forward_and_root(module: Any) -> tuple[Callable, Any]:
    """(images → scores callable, the nn.Module whose ``named_modules`` name the layers)."""
    import torch
    from torch import nn

    spec = getattr(module, "spec", type(module).__name__)
    if isinstance(module, nn.Module):
        forward, root = module, module
    elif isinstance(getattr(module, "module", None), nn.Module) and callable(getattr(module, "logits", None)):
        forward, root = module.logits, module.module  # a white-box classifier: its preprocessing is in the forward
    else:
        forward = root = None
    if root is not None:
        if any(isinstance(m, torch.jit.ScriptModule) for m in root.modules()):
            raise UsageError(f"ScoreCAM/Grad-CAM need an eager torch module; {spec} is TorchScript, whose compiled "
                             "forward does not call the hooks that read a layer: load the model with a python: "
                             "spec, or pass a mask with --region FILE|DIR")
        return forward, root
    raise UsageError(f"ScoreCAM/Grad-CAM need a white-box classifier (a torch module); {spec} is a black box: "
                     "pass a mask with --region FILE|DIR instead")


def conv_layers(module: Any) -> list[str]:
    """Dotted names of the ``Conv2d`` layers of ``module`` (or of a white-box classifier's module), in order."""
    from torch import nn

    _, root = _forward_and_root(module)
    return [name for name, m in root.named_modules() if isinstance(m, nn.Conv2d)]


#: element-wise activations that :func:`default_layer` follows a convolution into
_ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish")
#: layers skipped between a convolution and its activation (conv → norm → activation)
_NORMS = ("BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d", "LocalResponseNorm")


def default_layer(module: Any) -> str:
    """The layer used when none is named: the last ``nn.Conv2d``, **rectified**.

    CAM papers take the feature maps of the last convolutional stage, and their code hooks the rectified
    ones (VGG's ``relu5_3``, a ResNet block's output). So: the last ``Conv2d`` in ``named_modules()`` order; if
    the modules registered right after it are normalisation layers and then an element-wise activation
    (conv → [BatchNorm] → ReLU, as in ``nn.Sequential`` CNNs and torchvision ResNet blocks), that activation
    is returned instead (a module called several times, like ResNet's shared ``relu``, is read at its last
    call: the block output). The raw convolution is a poor default: on ``demo:digits`` its outputs are mostly
    negative and ScoreCAM is zero everywhere on 14 of the 16 demo images (measured), while its ReLU gives
    non-empty maps on all 16. Name a layer to override.
    """
    from torch import nn

    _, root = _forward_and_root(module)
    named = list(root.named_modules())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UsageError("the classifier has no Conv2d layer, so it has no default CAM layer: name one with "
                         "scorecam:LAYER (a module that outputs (N, C, h, w) feature maps)")
    last = convs[-1]
    for name, m in named[last + 1:]:
        kind = type(m).__name__
        if kind in _NORMS:
            continue
        if kind in _ACTIVATIONS:
            return name
        break
    return named[last][0]


def find_layer(module: Any, layer: str | None) -> tuple[str, Any]:
    """(name, submodule) for the dotted ``layer`` name (``None`` or ``""`` → :func:`default_layer`)."""
    _, root = _forward_and_root(module)
    if not layer:
        layer = default_layer(module)
    found = dict(root.named_modules())
    if layer not in found:
        convs = conv_layers(module)
        listed = ", ".join(convs[-12:]) if convs else "none"
        more = f" (last 12 of {len(convs)})" if len(convs) > 12 else ""
        raise UsageError(f"CAM layer {layer!r} is not a module of the classifier; its Conv2d layers{more}: {listed}")
    return layer, found[layer]


def _as_classes(classes: Any, n: int, device) -> torch.Tensor:
    import torch

    if isinstance(classes, int):
        classes = [classes] * n
    out = torch.as_tensor(classes, dtype=torch.long).reshape(-1).to(device)
    if out.numel() != n:
        raise ValueError(f"{out.numel()} classes given for {n} images")
    return out


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    return images.float()


def _feature_maps(out: Any, layer: str) -> torch.Tensor:
    """A layer's output as (N, C, h, w) maps: convolutional feature maps as they are; a transformer's tokens
    (N, L, C) on a square grid, L = h·w or 1 + h·w with the class token first (dropped), rearranged as the ViT
    ``reshape_transform`` of pytorch-grad-cam does (a grid of at least 2×2)."""
    import math

    import torch

    if isinstance(out, torch.Tensor) and out.ndim == 3:
        n, length, c = out.shape
        for skip in (0, 1):
            side = math.isqrt(max(length - skip, 0))
            if side > 1 and side * side == length - skip:
                return out[:, skip:].transpose(1, 2).reshape(n, c, side, side)
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"CAM layer {layer!r} outputs {shape}, not (N, C, h, w) feature maps nor (N, [1 +] h·w, C) "
                         "tokens on a square grid: name a convolutional or token layer")
    return out


def _capture(forward: Callable, target: Any, layer: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores of ``forward(images)``, the output of ``target`` during that pass, as the layer returned it (see
    :func:`_feature_maps`); the last call if reused)."""
    store: dict[str, Any] = {}

    def hook(_mod, _inp, out):
        store["a"] = out

    handle = target.register_forward_hook(hook)
    try:
        scores = forward(images)
    finally:
        handle.remove()
    if "a" not in store:
        raise UsageError(f"CAM layer {layer!r} is a module of the classifier that its forward pass never calls: "
                         "name another layer")
    _feature_maps(store["a"], layer)  # a layer without maps fails here, before any use
    return scores, store["a"]


def probe_layer(module: Any, layer: str | None, size: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """(resolved layer name, its output shape) from one forward pass on a black (1, 3, H, W) image: checks
    before any real work that the layer exists, runs, and gives (N, C, h, w) feature maps."""
    import torch

    forward, root = _forward_and_root(module)
    name, target = find_layer(module, layer)
    device = getattr(module, "device", None) or next((p.device for p in root.parameters()), "cpu")
    with torch.no_grad():
        _, acts = _capture(forward, target, name, torch.zeros(1, 3, int(size[0]), int(size[1]), device=device))
    return name, tuple(_feature_maps(acts, name).shape)


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min–max per map to [0, 1]; a constant map (e.g. all zero after the ReLU) becomes all zero."""
    import torch

    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


# --------------------------------------------------------------------------------------------- maps
def score_cam(module: Any, layer: str | None, images: torch.Tensor, classes: Any, *, batch_size: int = 64,
              subtract_baseline: bool = False) -> torch.Tensor:
    """ScoreCAM (Wang et al., CVPRW 2020) of class ``classes[i]`` for each image: (N, H, W) in [0, 1].

    For the activations ``A_k`` (k = 1..K channels) of ``layer`` on image X:

    1. ``H_k = s(Up(A_k))``: each channel bilinearly upsampled to the input's H×W and min–max normalised to
       [0, 1] (``s``); a constant channel carries no location and gets weight 0 (as in the authors' code).
    2. ``α_k = p_c(X ∘ H_k) − p_c(X_b)``: the confidence the masked input ``X ∘ H_k`` gives class c (``p`` = the
       softmax over classes, as in the authors' code) over that of a baseline ``X_b`` (the paper's
       "channel-wise increase of confidence", Def. 2).
    3. ``L = ReLU(Σ_k α_k Up(A_k))``, min–max normalised per image (an all-zero map stays zero).

    Baseline: by default the baseline score is 0 (``p_c(X_b) = 0``, the score of "no evidence"), which is what
    the authors' public code computes, and what the paper's own algorithm amounts to: it passes the increases
    through a softmax over channels, under which any baseline term cancels. ``subtract_baseline=True`` uses
    ``X_b = X ∘ 0`` (the input with every pixel masked out: black in [0, 1]). It is not the default because a
    classifier may be confident on that black image: ``demo:digits`` calls it "1" with p = 0.998, so no
    region of a "1" raises the probability above the baseline and its map is zero everywhere (measured).
    The two maps differ by ``p_c(X_b)·Σ_k Up(A_k)`` before the ReLU.

    ``module``: an ``nn.Module`` or a white-box classifier (its ``logits`` are used, so resizing and
    normalisation match what the classifier sees). ``layer``: a dotted name from ``named_modules()``; ``None``
    or ``""`` = :func:`default_layer`. ``images``: (N, 3, H, W) in [0, 1]. ``classes``: an int or N ints.
    ``batch_size``: masked copies per forward pass (K per image in all). Returns float32 on ``images.device``.
    """
    import torch

    from cfx_cli.images import resize_images  # numpy at its top: lazy like torch

    forward, _ = _forward_and_root(module)
    name, target = find_layer(module, layer)
    images = _check_images(images)
    n, _, h, w = images.shape
    cls = _as_classes(classes, n, images.device)
    rows = torch.arange(n, device=images.device)
    with torch.no_grad():
        _, acts = _capture(forward, target, name, images)
        acts = _feature_maps(acts, name).float()
        if subtract_baseline:
            base = torch.softmax(forward(torch.zeros_like(images)).float(), dim=1)[rows, cls]
        else:
            base = torch.zeros(n, device=images.device)
        k = acts.shape[1]
        maps = torch.zeros(n, h, w, device=images.device)
        for i in range(n):
            for s in range(0, k, batch_size):
                # upsample a chunk of channels at a time: K×H×W for every image at once would not fit in memory
                up = resize_images(acts[i:i + 1, s:s + batch_size], (h, w), antialias=False)[0]  # (b, H, W)
                flat = up.reshape(up.shape[0], -1)
                lo, hi = flat.min(1).values, flat.max(1).values
                live = hi > lo
                masks = (up - lo.view(-1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(-1, 1, 1)
                probs = torch.softmax(forward(images[i:i + 1] * masks[:, None]).float(), dim=1)[:, cls[i]]
                alpha = torch.where(live, probs - base[i], torch.zeros_like(probs))
                maps[i] += (alpha.view(-1, 1, 1) * up).sum(0)
    return _normalise(torch.relu(maps))


def grad_cam(module: Any, layer: str | None, images: torch.Tensor, classes: Any) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of class ``classes[i]`` for each image: (N, H, W) in [0, 1].

    ``α_k = mean_ij ∂y_c/∂A_k[i, j]`` with ``y_c`` the class score before the softmax (the classifier's logit;
    the log-probability for a classifier declared ``logits=false``), ``L = ReLU(Σ_k α_k A_k)`` at the layer's
    resolution, bilinearly upsampled to H×W, min–max normalised per image. Same arguments as :func:`score_cam`.
    """
    import torch

    from cfx_cli.images import resize_images  # numpy at its top: lazy like torch

    forward, _ = _forward_and_root(module)
    name, target = find_layer(module, layer)
    images = _check_images(images)
    n, _, h, w = images.shape
    cls = _as_classes(classes, n, images.device)
    with torch.enable_grad():
        # the classifier's weights are frozen, so the graph to the layer must start from the input
        x = images.detach().clone().requires_grad_(True)
        scores, out = _capture(forward, target, name, x)
        picked = scores[torch.arange(n, device=scores.device), cls.to(scores.device)].sum()
        (grads,) = torch.autograd.grad(picked, out)
    acts, grads = _feature_maps(out.detach(), name), _feature_maps(grads, name)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts.float()).sum(dim=1, keepdim=True))
    cam = resize_images(cam, (h, w), antialias=False)[:, 0]
    return _normalise(cam)


# --------------------------------------------------------------------------------------------- regions
def key_region(cam_maps: torch.Tensor, xi: float) -> torch.Tensor:
    """Binary key region ``M = [u_ij > ξ]`` of ECED's algorithm 1 (line 3): float32 {0, 1}, same shape.

    The comparison is strict (``>``, as written in the supplement) and applies to the normalised maps of
    :func:`score_cam`/:func:`grad_cam` (each map's maximum is 1), so any ξ in [0, 1) keeps at least the
    maximum of a non-zero map; ξ must lie in [0, 1) (the supplement's Proposition 2 range).
    """
    if not 0.0 <= float(xi) < 1.0:
        raise UsageError(f"threshold ξ = {xi}: must be in [0, 1) (the CAM maps are normalised to [0, 1])")
    return (cam_maps > float(xi)).float()


def latent_mask(mask: torch.Tensor, latent_hw: Sequence[int], *, mode: str = "nearest") -> torch.Tensor:
    """Downsample a binary image mask (..., H, W) to the latent grid (..., h, w): ECED's ``M' = downsample(M)``.

    The supplement rescales the mask as Blended Latent Diffusion does (Avrahami et al., whose code resizes the
    mask with nearest-neighbour sampling and thresholds at 0.5), so ``mode="nearest"`` (the default) samples
    the centre of each latent cell (PIL's rule; torch's ``nearest-exact``). Other rules: ``"any"`` marks a
    latent cell when any pixel it covers is in the mask (area average > 0: the latent mask covers the whole key
    region); ``"majority"`` when at least half of them are. A non-empty mask never becomes empty: an image
    whose ``nearest`` latent mask is empty falls back to ``"any"`` (a key region thinner than a latent cell).
    Returns float32 {0, 1} on the mask's device; leading dimensions are kept.
    """
    import torch.nn.functional as F

    if mode not in LATENT_MODES:
        raise UsageError(f"latent mask mode {mode!r}: expected one of {', '.join(LATENT_MODES)}")
    hw = (int(latent_hw[0]), int(latent_hw[1]))
    if mask.ndim < 2:
        raise ValueError(f"mask must be (..., H, W), got {tuple(mask.shape)}")
    lead = mask.shape[:-2]
    m = (mask.reshape(-1, 1, *mask.shape[-2:]) > 0.5).float()
    area = F.interpolate(m, size=hw, mode="area") if mode != "nearest" else None
    if mode == "nearest":
        out = F.interpolate(m, size=hw, mode="nearest-exact")
        empty = (out.flatten(1).sum(1) == 0) & (m.flatten(1).sum(1) > 0)
        if bool(empty.any()):
            out[empty] = (F.interpolate(m[empty], size=hw, mode="area") > 0).float()
    elif mode == "any":
        out = (area > 0).float()
    else:
        out = (area >= 0.5 - 1e-6).float()
    return out.reshape(*lead, *hw)
