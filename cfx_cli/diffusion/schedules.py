"""Beta schedules and timestep respacing (float64, as guided-diffusion and diffusers compute them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose cumulative product follows ``alpha_bar(t)``, t in [0, 1]; each beta capped at ``max_beta``."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def get_beta_schedule(
    name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
) -> torch.Tensor:
    """``linear`` (DDPM; guided-diffusion scales 1e-4→0.02 by 1000/num_steps unless start/end are given),
    ``scaled_linear`` (Stable Diffusion: linear in sqrt(beta), default 0.00085→0.012), or ``cosine``
    (Nichol & Dhariwal, s = 0.008, beta ≤ 0.999). float64, shape (num_steps,)."""
    if num_steps < 1:
        raise ValueError("num_steps must be ≥ 1")
    if name == "linear":
        if beta_start is None and beta_end is None:
            scale = 1000 / num_steps
            beta_start, beta_end = scale * 0.0001, scale * 0.02
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if name in ("scaled_linear", "scaled-linear"):
        beta_start = 0.00085 if beta_start is None else beta_start
        beta_end = 0.012 if beta_end is None else beta_end
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r} (linear, scaled_linear or cosine)")


def space_timesteps(num_steps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    """guided-diffusion's ``timestep_respacing``: which of the ``num_steps`` original steps to keep (sorted).

    ``"ddimN"``: an evenly strided ``range(0, num_steps, stride)`` with exactly N elements.
    ``"10,15,20"`` (or a list): split the steps into equal sections and take that many evenly spaced steps
    from each (``"250"`` = 250 steps from one section). ``""`` keeps all steps.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        text = section_counts.strip()
        if not text:
            return list(range(num_steps))
        if text.startswith("ddim"):
            desired = int(text[len("ddim") :])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_steps}")
        section_counts = [int(x) for x in text.split(",")]
    counts = list(section_counts)
    size_per, extra = divmod(num_steps, len(counts))
    start = 0
    steps: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))  # Python's round (half to even), as the original
            cur += stride
        start += size
    return sorted(steps)


def respace_betas(betas: torch.Tensor, use_timesteps: Iterable[int]) -> tuple[torch.Tensor, list[int]]:
    """Betas of the sub-chain through ``use_timesteps`` (so its alphas_cumprod equal the original's at the kept
    steps) and the map from new indices to original timesteps."""
    keep = set(int(t) for t in use_timesteps)
    alphas_cumprod = torch.cumprod(1.0 - betas.double(), dim=0)
    last = 1.0
    new_betas, timestep_map = [], []
    for i, ac in enumerate(alphas_cumprod.tolist()):
        if i in keep:
            new_betas.append(1.0 - ac / last)
            last = ac
            timestep_map.append(i)
    return torch.tensor(new_betas, dtype=torch.float64), timestep_map


def i2sb_betas(interval: int = 1000, beta_max: float = 0.3, beta_min: float = 1e-4) -> torch.Tensor:
    """I2SB's symmetric schedule: a quadratic ramp (linear in sqrt(beta)) from ``beta_min`` to
    ``beta_max / interval`` over ``interval`` steps, of which the first half is kept and mirrored."""
    ramp = torch.linspace(beta_min**0.5, (beta_max / interval) ** 0.5, interval, dtype=torch.float64) ** 2
    half = ramp[: interval // 2]
    return torch.cat([half, half.flip(0)])
