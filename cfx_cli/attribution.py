"""Attributions of a white-box classifier and the regions made from them: Integrated Gradients in a noise tunnel
and the c×c grid cells covering a fraction of the image (RCSB §3, "automated region extraction"). The
``--region auto`` source (``cfx_plugins/regions/auto.py``) is a thin wrapper over these; the CAM maps are in
:mod:`cfx_cli.saliency`."""

from __future__ import annotations

from typing import Any

import numpy as np

from cfx_cli.errors import UsageError

#: Integrated Gradients defaults: Riemann steps, noise-tunnel σ and samples (RCSB's code: σ 0.05)
IG_STEPS, IG_NOISE, IG_SAMPLES = 32, 0.05, 4


def integrated_gradients(classifier: Any, x, steps: int = IG_STEPS, noise: float = IG_NOISE, samples: int = IG_SAMPLES,
                         seed: int = 0, target=None, use_captum: bool | None = None):
    """IG of the predicted class (black baseline) averaged over a noise tunnel (SmoothGrad-style, σ = ``noise``).

    Uses captum's ``IntegratedGradients`` + ``NoiseTunnel`` when captum is installed (the ``regions`` extra;
    captum's default Gauss–Legendre rule: its "riemann_trapezoid" weights sum to 1 − 1/n, not 1); otherwise the
    same quantity computed here: the trapezoid rule over ``steps`` intervals
    (``use_captum=False`` forces it; ``True`` requires captum).
    """
    import torch

    with torch.no_grad():
        pred = classifier.logits(x).argmax(1) if target is None else target
    gen = torch.Generator().manual_seed(int(seed))

    def forward(inp):
        return classifier.logits(inp)

    IntegratedGradients = None  # noqa: N806
    if use_captum is not False:
        try:
            from captum.attr import IntegratedGradients, NoiseTunnel
        except Exception:  # noqa: BLE001 - captum absent or broken beside this torch: use our own IG
            if use_captum:
                raise UsageError("--region auto: captum is not importable (pip install 'cfx[regions]')") from None
    if IntegratedGradients is not None:
        ig = IntegratedGradients(forward)
        with torch.random.fork_rng(devices=[]):  # captum's noise tunnel draws from the global generator
            torch.manual_seed(int(seed))
            if samples > 1 and noise > 0:
                out = NoiseTunnel(ig).attribute(x, nt_type="smoothgrad", nt_samples=samples, stdevs=noise,
                                                target=pred, n_steps=steps)
            else:
                out = ig.attribute(x, target=pred, n_steps=steps)
        return out.detach().cpu()
    total = torch.zeros_like(x)
    n = samples if (samples > 1 and noise > 0) else 1
    alphas = torch.linspace(0, 1, steps + 1)
    w = torch.full((steps + 1,), 1.0 / steps)
    w[0] = w[-1] = 0.5 / steps  # trapezoid weights
    for _ in range(n):
        xs = x + noise * torch.randn(x.shape, generator=gen) if n > 1 else x
        path = (alphas.view(-1, 1, 1, 1) * xs).requires_grad_(True)  # baseline 0 → xs
        with torch.enable_grad():
            logits = classifier.logits(path)
            picked = logits[torch.arange(len(path)), pred.expand(len(path)).to(logits.device)].sum()
            (g,) = torch.autograd.grad(picked, path)
        total += xs * (w.view(-1, 1, 1, 1) * g.cpu()).sum(0, keepdim=True)
    return (total / n).detach()


def cells_covering(heat: np.ndarray, area: float, cell: int, clip: float = 98.0) -> np.ndarray:
    """Binary (H, W) mask: c×c cells of the highest summed (percentile-clipped) ``heat`` until ``area`` of the
    image is covered (the last cell may overshoot; at least one cell)."""
    h, w = heat.shape
    heat = np.minimum(heat, np.percentile(heat, clip)) if clip < 100 else heat
    gh, gw = -(-h // cell), -(-w // cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=np.float64)
    padded[:h, :w] = heat
    sums = padded.reshape(gh, cell, gw, cell).sum(axis=(1, 3))
    order = np.argsort(-sums, axis=None, kind="stable")
    grid = np.zeros(gh * gw, dtype=bool)
    full = np.zeros((gh * cell, gw * cell), dtype=bool)
    covered, goal = 0, area * h * w
    for k in order:
        if covered >= goal - 1e-9:
            break
        grid[k] = True
        r, c = divmod(int(k), gw)
        full[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = True
        covered = int(full[:h, :w].sum())
    return full[:h, :w].astype(np.float32)
