"""Insertion and deletion (Petsiuk et al., BMVC 2018) as the HiT chapter uses them (thesis §6.4.1, §6.4.3).

For an image x, a saliency map of its predicted class c and a corrupted copy x̃ ("zero" or "blur"), the map's
cells are ranked from most to least salient; at step k of ``steps`` the top ``n_k = k·cells/steps`` cells
(cells of the map, upsampled nearest to the image) are

- inserted: ``x·M_k + x̃·(1 − M_k)`` (starts from x̃, ends at x), or
- deleted: ``x̃·M_k + x·(1 − M_k)`` (starts from x, ends at x̃),

and the classifier's softmax probability of c is recorded: one curve of ``steps + 1`` points per image. The
curves are averaged over the images, and the mean curve's area is the trapezoid rule on [0, 1]
(``(Σ − first/2 − last/2)/steps``, the authors' ``auc``); the thesis reports the **normalised** AUC, that area
divided by the curve's maximum (§6.4.3: "nAUC, i.e. the AUC divided by the maximum value of the curve"). Higher
insertion and lower deletion are better. This is the authors' CausalMetrics.py (their ``steps`` is 14·14 = 196;
their class is the predicted one, ``use_label=False``).

Corruptions, as the authors apply them to **normalised** model inputs, mapped to cfx's [0, 1] images through the
classifier's normalisation mean m (the ``fill``): "zero" is the normalised zero image, i.e. m everywhere (black
for a classifier without a declared normalisation); "blur" is their Gaussian kernel (``gkern(11, 5)``:
scipy.ndimage.gaussian_filter of an 11×11 delta, σ = 5, reflect mode) convolved with zero padding in normalised
space, i.e. ``conv(x − m) + m`` here. Ties in a map (e.g. Grad-CAM's zeros) are ranked in pixel order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfx_cli import saliency
from cfx_cli.errors import MetricUnavailable, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.images import resize_images
from cfx_cli.metrics import Metric

#: the authors' number of steps (CausalMetrics.py: ``steps=14 * 14``)
DEFAULT_STEPS = 196
MODES = ("insertion", "deletion")
SUBSTRATES = ("zero", "blur")
#: the authors' blur: gkern(klen=11, nsig=5)
BLUR_SIZE, BLUR_SIGMA = 11, 5.0
#: map sources :func:`saliency_maps` knows (gradcam/scorecam take ``:LAYER``)
MAP_SOURCES = ("hit", "rollout", "gradcam", "scorecam", "ig")


def gaussian_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA, truncate: float = 4.0) -> np.ndarray:
    """The authors' ``gkern``: scipy.ndimage.gaussian_filter of a centred ``size``×``size`` delta (σ, truncate 4,
    mode 'reflect' — the half-sample mirror, which folds the tails back so the kernel sums to 1)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * offsets.astype(np.float64) ** 2 / sigma ** 2)
    w /= w.sum()
    centre = size // 2
    k1 = np.zeros(size, dtype=np.float64)
    for i in range(size):
        for off, wj in zip(offsets, w, strict=True):
            j = (i + off) % (2 * size)
            if (j if j < size else 2 * size - 1 - j) == centre:
                k1[i] += wj
    return np.outer(k1, k1)


def fill_colour(classifier: Any) -> tuple[float, float, float]:
    """The [0, 1] colour that the classifier normalises to zero: its declared mean (``#mean=``, the ``hit:``
    adapter's, a ``python:`` spec's), else black."""
    mean = getattr(getattr(classifier, "module", None), "mean", None)
    try:
        values = [float(v) for v in mean.reshape(-1).tolist()] if mean is not None else []
    except (AttributeError, TypeError, ValueError):
        values = []
    if len(values) == 1:
        values *= 3
    return tuple(values) if len(values) == 3 else (0.0, 0.0, 0.0)


def corrupted(images, substrate: str, fill):
    """The fully corrupted images x̃ (N, 3, H, W) in [0, 1] space."""
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    if substrate == "zero":
        return m.expand_as(images).clone()
    if substrate == "blur":
        k = torch.from_numpy(gaussian_kernel()).to(images).view(1, 1, BLUR_SIZE, BLUR_SIZE)
        c = images.shape[1]
        return F.conv2d(images - m, k.expand(c, 1, -1, -1), padding=BLUR_SIZE // 2, groups=c) + m
    raise UsageError(f"substrate {substrate!r}: expected one of {', '.join(SUBSTRATES)}")


def causal_curves(classifier: Any, images, maps, classes=None, mode: str = "insertion", substrate: str = "zero",
                  steps: int = DEFAULT_STEPS, fill=None, batch_size: int = 256):
    """(N, steps + 1) probabilities of ``classes`` (default: predicted) as the map's cells are inserted/deleted.

    ``images``: (N, 3, H, W) in [0, 1]; ``maps``: (N, h, w), any resolution (upsampled nearest to H×W for the
    masks); ``classifier``: anything with ``predict_proba`` (black boxes too)."""
    import torch

    if mode not in MODES:
        raise UsageError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if steps < 1:
        raise UsageError(f"steps={steps}: must be at least 1")
    images = images.float().cpu()
    maps = maps.float().cpu()
    n, _, h, w = images.shape
    if maps.ndim != 3 or maps.shape[0] != n:
        raise ValueError(f"maps must be (N, h, w) for {n} images, got {tuple(maps.shape)}")
    fill = fill_colour(classifier) if fill is None else fill
    if classes is None:
        classes = classifier.predict_proba(images).argmax(dim=1)
    classes = torch.as_tensor(classes).long().reshape(-1)
    cells = maps.shape[1] * maps.shape[2]
    flat = maps.reshape(n, -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cells).expand(n, -1).contiguous())
    rank = resize_images(rank.view(n, 1, *maps.shape[1:]).float(), (h, w), nearest=True)  # (N, 1, H, W)
    counts = torch.linspace(0, cells, steps + 1)
    damaged = corrupted(images, substrate, fill)
    out = torch.empty(n, steps + 1)
    for i in range(n):
        masks = (rank[i] < counts.view(-1, 1, 1, 1)).float()  # (steps + 1, 1, H, W): the top cells
        if mode == "insertion":
            mixed = images[i] * masks + damaged[i] * (1 - masks)
        else:
            mixed = damaged[i] * masks + images[i] * (1 - masks)
        for s in range(0, steps + 1, batch_size):
            probs = classifier.predict_proba(mixed[s:s + batch_size])
            out[i, s:s + batch_size] = probs[:, int(classes[i])]
    return out


def auc(curve) -> float:
    """Trapezoid area of a curve sampled evenly on [0, 1] (the authors' ``auc``)."""
    c = np.asarray(curve, dtype=np.float64)
    return float((c.sum() - c[0] / 2 - c[-1] / 2) / (len(c) - 1))


def nauc(curve) -> float:
    """The thesis' normalised AUC: :func:`auc` divided by the curve's maximum."""
    top = float(np.max(curve))
    return auc(curve) / top if top > 0 else float("nan")


def evaluate_maps(classifier: Any, images, maps, classes=None, steps: int = DEFAULT_STEPS, fill=None) -> dict:
    """``{"ins_zero": nAUC, ..., "del_blur": nAUC}`` over the mean curves, plus ``*_auc`` (unnormalised) and the
    mean curves under ``curves``."""
    import torch

    if classes is None:
        classes = classifier.predict_proba(images.float().cpu()).argmax(dim=1)
    result: dict[str, Any] = {"curves": {}}
    for mode in MODES:
        for sub in SUBSTRATES:
            key = f"{mode[:3]}_{sub}"
            mean = causal_curves(classifier, images, maps, classes, mode, sub, steps, fill).mean(dim=0)
            result[key] = nauc(mean.numpy())
            result[f"{key}_auc"] = auc(mean.numpy())
            result["curves"][key] = [float(v) for v in mean]
    del torch
    return result


def saliency_maps(classifier: Any, images, source: str):
    """(N, h, w) maps of the predicted class from ``source``: ``hit`` (HiT's decomposition), ``rollout`` (on a
    HiT), ``gradcam:LAYER`` / ``scorecam:LAYER`` (:mod:`cfx_cli.saliency`; empty LAYER = its default),
    ``ig`` (Integrated Gradients in a noise tunnel, |attribution| summed over channels, as ``--region auto``)."""
    import torch

    from cfx_cli.attribution import integrated_gradients, seeded_tunnel

    name, _, arg = source.partition(":")
    if name not in MAP_SOURCES:
        raise UsageError(f"saliency map {source!r}: expected one of hit, rollout, gradcam:LAYER, scorecam:LAYER, ig")
    if name in ("hit", "rollout"):
        from cfx_plugins.classifiers.hit.maps import hit_maps, rollout_maps

        return hit_maps(classifier, images) if name == "hit" else rollout_maps(classifier, images)
    with torch.no_grad():
        pred = classifier.logits(images).argmax(dim=1)
    if name in ("gradcam", "scorecam"):
        fn = saliency.grad_cam if name == "gradcam" else saliency.score_cam
        return fn(classifier, arg or None, images, pred)
    # IG with the defaults of --region auto (cfx_cli.attribution.IG_STEPS, IG_NOISE, IG_SAMPLES); the map is
    # Σ_c |attr|, unclipped (the region rule's [0, 1] clip would tie the top pixels that the curves rank)
    maps = [integrated_gradients(classifier, images[i:i + 1], target=pred[i:i + 1],
                                 tunnel=seeded_tunnel(images[i:i + 1], seed=i)).abs().sum(dim=1)
            for i in range(images.shape[0])]
    return torch.cat(maps)


def _map_source_of_run(run, classifier) -> str:
    """The run's own region source when it is a map (hit, gradcam:L, scorecam:L, auto → ig), else hit on a HiT."""
    from cfx_plugins.classifiers.hit.maps import find_hit

    region = str(run.info.get("mask") or "")
    name = region.partition(":")[0]
    if region == "auto":
        return "ig"
    if name in ("hit", "gradcam", "scorecam"):
        return region
    if find_hit(classifier) is not None:
        return "hit"
    raise MetricUnavailable("no saliency map to evaluate: name one with --set insdel_map=hit|rollout|gradcam:LAYER|"
                            "scorecam:LAYER|ig")


class InsertionDeletion(Metric):
    name = "insertion_deletion"
    summary = ("insertion/deletion nAUC (Petsiuk et al.; zero and blur corruption) of the saliency map of the "
               "originals' predicted class (--set insdel_map=hit|rollout|gradcam:L|scorecam:L|ig, default: the "
               "run's --region source; insdel_steps=196)")
    needs = frozenset({"classifier"})
    default = False
    lower_is_better = None  # insertion: higher is better; deletion: lower

    def compute(self, run, context):
        import torch

        recs = [r for r in run.records if r.get("original")]
        if not recs:
            raise MetricUnavailable("the run has no originals")
        classifier = context.classifier()
        if "gradients" not in getattr(classifier, "capabilities", ()):
            raise MetricUnavailable(f"classifier {classifier.spec} is a black box: its saliency maps need gradients")
        opts = context.options
        try:
            steps = int(opts.get("insdel_steps", DEFAULT_STEPS))
        except ValueError:
            raise UsageError(f"--set insdel_steps={opts['insdel_steps']}: expected an integer") from None
        source = opts.get("insdel_map") or _map_source_of_run(run, classifier)
        device = getattr(classifier, "device", "cpu")
        images = torch.from_numpy(np.stack([run.image(r["original"]) for r in recs])).permute(0, 3, 1, 2).float()
        maps = saliency_maps(classifier, images.to(device), source).detach().cpu()
        result = evaluate_maps(classifier, images, maps, steps=steps)
        out = {k: v for k, v in result.items() if k in ("ins_zero", "ins_blur", "del_zero", "del_blur")}
        return {**out, "insdel_n": len(recs)}


@hookimpl
def register_metrics(register):
    register(InsertionDeletion)
