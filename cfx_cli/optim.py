"""Adam (Kingma & Ba, ICLR 2015, Alg. 1) as a pure, batched function, and its per-row state.

RCSB uses the update direction alone (its "Adam stabilization" of the classifier gradient, lr = 1); ECED updates
rows of z_init with it, each image keeping its own step count so a stopped (flipped) image's state is untouched.
``torch.optim.Adam`` remains the choice where whole parameters are optimised (ECED's Alg. 2).
"""

from __future__ import annotations

import torch


def adam_update(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, k: int | torch.Tensor,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                lr: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², and the update lr·m̂ / (√v̂ + ε) with the
    bias corrections m̂ = m / (1 − β1^k), v̂ = v / (1 − β2^k). ``k`` (≥ 1) is the step number: an int, or a tensor
    broadcasting against ``m`` for per-row counts. Returns (m, v, update); the caller subtracts (descent) or adds
    (ascent) the update."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    return m, v, lr * (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)


class AdamRows:
    """Adam state for the rows of a tensor (one row per image): rows that stop keep their state untouched, so every
    image's trajectory is independent of the others."""

    def __init__(self, like: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.k = torch.zeros(like.shape[0], dtype=torch.long)
        self.lr, self.betas, self.eps = lr, betas, eps

    def step(self, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """Descend ``param[rows]`` along ``grad`` (one row of grad per entry of ``rows``), in place."""
        self.k[rows.cpu()] += 1
        k = self.k[rows.cpu()].to(param.dtype).to(param.device).view(-1, *([1] * (param.ndim - 1)))
        m, v, update = adam_update(self.m[rows], self.v[rows], grad, k, self.betas, self.eps, self.lr)
        self.m[rows], self.v[rows] = m, v
        param[rows] = param[rows] - update
