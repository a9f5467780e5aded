"""Per-image Gaussian noise: the one place where explainers draw their random numbers.

An explainer asks its context's :class:`NoiseSource` for the noise of a batch (``context.noise.for_batch(ids,
seeds, device)``) and draws from the :class:`BatchNoise` it gets back. Every draw is *named* (what it is for:
``"z_tau"``, ``"ddpm_step"``, …) and *indexed* (where it happens: attempt, iteration, step), so a replacement
source can be an order-free function of (image, name, index, shape), which is how the faithfulness fixtures feed
the authors' reference noise (``constant_noise``: every draw returns the same tensor, whatever the order).

The default, :class:`SeededNoise`, draws image i's noise from its own ``torch.Generator().manual_seed(seed_i)``
in call order and ignores names and indices: an image's stream depends only on its seed and on the draws it went
through, never on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

#: (name, index) of one draw; the index says where in the algorithm it happens, e.g. (attempt, step)
DrawKey = tuple[str, tuple[int, ...]]


@dataclass(frozen=True)
class Draw:
    """One image's draw, as a replacement noise function sees it."""

    image: str  # the input id
    seed: int  # the image's seed (derived from --seed and the id)
    name: str
    index: tuple[int, ...] = ()


#: an order-free noise function: (draw, shape of one image's draw) → tensor of that shape
DrawFn = Callable[[Draw, tuple[int, ...]], torch.Tensor]


class BatchNoise(Protocol):
    """The noise of one batch; ``rows`` index the batch's images (a subset while others are done)."""

    device: str | torch.device  # where the draws are returned

    def randn(self, rows: Sequence[int], shape: tuple[int, ...], name: str,
              index: tuple[int, ...] = ()) -> torch.Tensor:
        """(len(rows), *shape) standard normal: one draw of ``shape`` per listed image, in that order."""
        ...

    def randn_block(self, rows: Sequence[int], shape: tuple[int, ...], keys: Sequence[DrawKey]) -> torch.Tensor:
        """(len(rows), len(keys), *shape): the draws ``keys`` of each listed image, taken together."""
        ...


class NoiseSource(Protocol):
    """Where an explainer's random numbers come from (``ExplainContext.noise``)."""

    def for_batch(self, ids: Sequence[str], seeds: Sequence[int], device: str | torch.device) -> BatchNoise:
        ...


class SeededBatchNoise:
    """:class:`BatchNoise` of :class:`SeededNoise`: one generator per image, drawn from in call order."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def randn(self, rows: Sequence[int], shape: tuple[int, ...], name: str,
              index: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=self.generators[i]) for i in rows]).to(self.device)

    def randn_block(self, rows: Sequence[int], shape: tuple[int, ...], keys: Sequence[DrawKey]) -> torch.Tensor:
        # one call of len(keys)·|shape| numbers per image (the order ACE has always drawn its filter noise in)
        return self.randn(rows, (len(keys), *shape), keys[0][0] if keys else "")


class SeededNoise:
    """The default source: image i's draws come from ``torch.Generator().manual_seed(seed_i)`` (CPU, float32),
    then move to the device; names and indices are not used."""

    def for_batch(self, ids: Sequence[str], seeds: Sequence[int], device: str | torch.device) -> SeededBatchNoise:
        return SeededBatchNoise(seeds, device)


class FunctionBatchNoise:
    """:class:`BatchNoise` of :class:`FunctionNoise`: every draw is ``fn(Draw(...), shape)``."""

    def __init__(self, fn: DrawFn, ids: Sequence[str], seeds: Sequence[int], device: str | torch.device) -> None:
        self.fn, self.ids, self.seeds, self.device = fn, list(ids), [int(s) for s in seeds], device

    def _one(self, row: int, shape: tuple[int, ...], name: str, index: tuple[int, ...]) -> torch.Tensor:
        out = self.fn(Draw(self.ids[row], self.seeds[row], name, tuple(index)), tuple(shape))
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"noise function returned shape {tuple(out.shape)} for draw {name}{index}, "
                             f"expected {tuple(shape)}")
        return out.float()

    def randn(self, rows: Sequence[int], shape: tuple[int, ...], name: str,
              index: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.stack([self._one(i, shape, name, index) for i in rows]).to(self.device)

    def randn_block(self, rows: Sequence[int], shape: tuple[int, ...], keys: Sequence[DrawKey]) -> torch.Tensor:
        return torch.stack([torch.stack([self._one(i, shape, n, ix) for n, ix in keys]) for i in rows]
                           ).to(self.device)


class FunctionNoise:
    """A source defined by an order-free function of (image, name, index, shape), e.g. a test's or a reference
    implementation's noise: the same draw always returns the same tensor, whatever the batch or call order."""

    def __init__(self, fn: DrawFn) -> None:
        self.fn = fn

    def for_batch(self, ids: Sequence[str], seeds: Sequence[int], device: str | torch.device) -> FunctionBatchNoise:
        return FunctionBatchNoise(self.fn, ids, seeds, device)


def constant_noise(seed: int) -> FunctionNoise:
    """The fixtures' noise (fixtures/*-e2e/README.md, "Noise (order-free)"): every draw of every image is
    ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``."""

    def fn(draw: Draw, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))

    return FunctionNoise(fn)
