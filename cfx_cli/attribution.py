"""Attributions of a white-box classifier and the regions made from them: Integrated Gradients in a noise tunnel
and the c×c grid cells covering a fraction of the image (RCSB §3, "automated region extraction"). The
``--region auto`` source (``cfx_plugins/regions/auto.py``) is a thin wrapper over these; the CAM maps are in
:mod:`cfx_cli.saliency`.

The default rule is the authors' (RCSB's ``IntegratedGradients.get_attr_maps`` + ``postprocess_attr_maps``, with
captum's IG and noise tunnel): :func:`integrated_gradients` (Gauss–Legendre, zero baseline, SmoothGrad over
perturbed copies), :func:`heat_map` (|Σ_c attr| divided by captum's 98 % cumulative-mass value, clipped to
[0, 1]), :func:`cell_sums`, :func:`area_filter` (the 200-level quantile scan). :func:`cells_covering` is cfx's
earlier rule (``--set region_rule=cfx``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cfx_cli.errors import UsageError

if TYPE_CHECKING:
    from cfx_cli.diffusion.noise import BatchNoise

#: Integrated Gradients defaults (RCSB's configs/explainer/integrated_gradients.yaml with captum's defaults):
#: Gauss–Legendre steps, noise-tunnel σ (absolute) and samples, rows per classifier call
IG_STEPS, IG_NOISE, IG_SAMPLES, IG_INTERNAL_BATCH = 50, 0.05, 5, 64
#: the name of the noise-tunnel draws (index (k,) = sample k) in :mod:`cfx_cli.diffusion.noise`
TUNNEL_DRAW = "ig_tunnel"
#: RCSB's area scan: quantile levels of the cell map from 1 down to 0
AREA_LEVELS = 200


def gauss_legendre(steps: int) -> tuple[list[float], list[float]]:
    """(alphas, weights) of the ``steps``-point Gauss–Legendre rule on [0, 1] (captum's default IG method)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return list(0.5 * (1 + nodes)), list(0.5 * weights)


def tunnel_draws(draws: BatchNoise, n: int, shape: tuple[int, ...], samples: int, sigma: float):
    """(n, samples, *shape): σ·N(0, 1) noise-tunnel perturbations of ``n`` images, draw (``ig_tunnel``, (k,)) for
    sample k of each image (the default source draws them from the image's own generator)."""
    keys = [(TUNNEL_DRAW, (k,)) for k in range(samples)]
    return sigma * draws.randn_block(range(n), tuple(shape), keys)


def seeded_tunnel(x, samples: int = IG_SAMPLES, sigma: float = IG_NOISE, seed: int = 0):
    """Noise-tunnel perturbations of a batch ``x`` from one seed (for callers without a noise source)."""
    from cfx_cli.diffusion.noise import SeededNoise

    draws = SeededNoise().for_batch([str(i) for i in range(len(x))], [seed + i for i in range(len(x))], "cpu")
    return tunnel_draws(draws, len(x), tuple(x.shape[1:]), samples, sigma)


def integrated_gradients(classifier: Any, x, target=None, steps: int = IG_STEPS, tunnel=None,
                         internal_batch: int = IG_INTERNAL_BATCH, use_captum: bool = False):
    """IG of ``target`` (default: the predicted class) from the zero baseline with the ``steps``-point
    Gauss–Legendre rule, on (B, C, H, W) ``x``; with ``tunnel`` (B, S, C, H, W) perturbations, the SmoothGrad
    noise tunnel: the mean of IG at x + tunnel[:, k] over k (captum's ``NoiseTunnel``: row b·S + k of the
    expanded batch). Classifier calls take at most ``internal_batch`` rows (whole steps, as captum splits them).

    ``use_captum=True`` computes the same rows with captum's ``IntegratedGradients`` (a cross-check; the ``regions``
    extra); cfx's own implementation is the default, so results do not depend on captum being installed.
    """
    import torch

    with torch.no_grad():
        pred = classifier.logits(x).argmax(1) if target is None else torch.as_tensor(target)
    pred = pred.to(x.device).long()
    samples = 1 if tunnel is None else tunnel.shape[1]
    rows = x if tunnel is None else x.repeat_interleave(samples, 0) + tunnel.flatten(0, 1).to(x)
    rows_target = pred.repeat_interleave(samples)
    if use_captum:
        try:
            from captum.attr import IntegratedGradients
        except Exception:  # noqa: BLE001 - captum absent or broken beside this torch
            raise UsageError("integrated gradients: captum is not importable (pip install 'cfx[regions]')") from None
        attr = IntegratedGradients(classifier.logits).attribute(
            rows, target=rows_target, n_steps=steps, method="gausslegendre", internal_batch_size=internal_batch)
    else:
        attr = _ig_rows(classifier, rows, rows_target, steps, internal_batch)
    return attr.detach().reshape(len(x), samples, *x.shape[1:]).mean(1).cpu()


def _ig_rows(classifier: Any, rows, target, steps: int, internal_batch: int):
    """Σ_j w_j ∇f_target(α_j·row) · row for every row (the zero baseline), whole steps per classifier call."""
    import torch

    alphas, weights = gauss_legendre(steps)
    n = len(rows)
    per_call = max(1, internal_batch // n)  # captum's split: whole steps, at most internal_batch rows
    total = torch.zeros_like(rows)
    for start in range(0, steps, per_call):
        chunk = range(start, min(steps, start + per_call))
        scaled = torch.cat([alphas[j] * rows for j in chunk]).requires_grad_(True)
        with torch.enable_grad():
            logits = classifier.logits(scaled)
            picked = logits[torch.arange(len(scaled), device=logits.device), target.repeat(len(chunk))]
            (g,) = torch.autograd.grad(picked.sum(), scaled)
        w = torch.tensor([weights[j] for j in chunk], dtype=torch.float32, device=g.device)
        total += (g.reshape(len(chunk), n, *rows.shape[1:]) * w.view(-1, *([1] * rows.ndim))).sum(0)
    return total * rows


def heat_map(attr, outlier_perc: float = 2.0):
    """(B, H, W) RCSB's heat map of (B, C, H, W) attributions (its ``normalize_attr``, sign "absolute_value",
    adapted from captum's visualisation): |Σ_c attr| divided by the value at which the ascending cumulative sum
    passes (100 − outlier_perc) % of the total, clipped to [0, 1]."""
    import torch

    heat = attr.sum(dim=1).abs()
    flat = heat.flatten(1).sort(dim=1)[0]
    cum = flat.cumsum(dim=1)
    first = (cum > cum[:, -1:] * (0.01 * (100 - outlier_perc))).int().argmax(dim=1)
    scale = torch.gather(flat, 1, first[:, None]).flatten()
    scale = torch.where(scale == 0, torch.full_like(scale, 1e-5), scale)  # the code's guard (an all-zero map)
    return (heat / scale.view(-1, 1, 1)).clip(-1, 1)


def cell_sums(heat, cell: int):
    """(B, ⌈H/c⌉, ⌈W/c⌉): ``heat`` (B, H, W) summed over c×c cells (zero-padded at the bottom/right edge when
    the size is not a multiple of c; RCSB's code requires that it is)."""
    import torch.nn.functional as F

    b, h, w = heat.shape
    gh, gw = -(-h // cell), -(-w // cell)
    padded = F.pad(heat, (0, gw * cell - w, 0, gh * cell - h))
    return padded.reshape(b, gh, cell, gw, cell).sum(dim=(2, 4))


def area_filter(cells, area: float):
    """(B, gh, gw) bool: the cells RCSB's ``filter_area`` keeps (then binarized at > 0). Per map: if the cells
    > 0 already cover at most ``area`` of the cells, all of them; otherwise scan 200 quantile levels of the map
    from 1 down to 0 (torch.quantile, linear) and keep the cells ≥ the last level whose selection covers at most
    ``area`` (as the code does, a scan whose first level already covers more wraps to the lowest level)."""
    import torch

    total = cells.shape[-2] * cells.shape[-1]
    kept = []
    for cmap in cells:
        if (cmap > 0).sum() / total <= area:
            best = torch.zeros((), dtype=cmap.dtype)
        else:
            levels = cmap.flatten().quantile(torch.linspace(1.0, 0.0, AREA_LEVELS, dtype=cmap.dtype))
            over = (i for i, level in enumerate(levels) if (cmap >= level).sum() / total > area)
            best = levels[next(over, len(levels) - 1) - 1]  # the code's loop: the level before the first over
        kept.append((cmap >= best) & (cmap > 0))
    return torch.stack(kept)


def expand_cells(cell_mask, cell: int, size: tuple[int, int]):
    """(B, H, W) pixels of a (B, gh, gw) cell mask."""
    return cell_mask.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)[..., : size[0], : size[1]]


@dataclass
class RegionTrace:
    """Every stage of one batch's automatic regions (RCSB's ``postprocess_attr_maps``), for inspection and tests."""

    target: Any  # (B,) the class IG attributes (the predicted one)
    attr: Any  # (B, C, H, W) smoothed IG attribution
    heat: Any  # (B, H, W) after the sign/outlier normalisation
    cells: Any  # (B, gh, gw) heat summed per cell
    region: Any  # (B, H, W) float32 in {0, 1}


def rcsb_region(attr, area: float, cell: int, clip: float = 98.0) -> tuple[Any, Any, Any]:
    """(heat, cells, region (B, H, W) float32) of (B, C, H, W) attributions by RCSB's rule; ``clip`` is the
    cumulative-mass percentile of :func:`heat_map`."""
    heat = heat_map(attr, 100.0 - clip)
    cells = cell_sums(heat, cell)
    region = expand_cells(area_filter(cells, area), cell, tuple(heat.shape[-2:])).float()
    return heat, cells, region


def cells_covering(heat: np.ndarray, area: float, cell: int, clip: float = 98.0) -> np.ndarray:
    """cfx's earlier rule (``region_rule=cfx``), on ``heat`` = Σ_c |attr|: binary (H, W) mask of the c×c cells of
    the highest summed heat, clipped at its ``clip`` percentile, until ``area`` of the image is covered (the last
    cell may overshoot; at least one cell)."""
    h, w = heat.shape
    heat = np.minimum(heat, np.percentile(heat, clip)) if clip < 100 else heat
    gh, gw = -(-h // cell), -(-w // cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=np.float64)
    padded[:h, :w] = heat
    sums = padded.reshape(gh, cell, gw, cell).sum(axis=(1, 3))
    order = np.argsort(-sums, axis=None, kind="stable")
    full = np.zeros((gh * cell, gw * cell), dtype=bool)
    covered, goal = 0, area * h * w
    for k in order:
        if covered >= goal - 1e-9:
            break
        r, c = divmod(int(k), gw)
        full[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = True
        covered = int(full[:h, :w].sum())
    return full[:h, :w].astype(np.float32)
