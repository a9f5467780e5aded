"""Region sources: where an explainer may change the image (``--region auto|FILE|DIR|SCHEME:ARG``).

A region is a binary float32 (H, W) mask, 1 = may change. Three kinds of sources:

- ``auto``: from attributions (RCSB §3, "automated region extraction"): Integrated Gradients of the predicted
  class in a noise tunnel, |attribution| summed over channels, clipped at a percentile, summed into c×c grid
  cells, cells kept from the highest down until they cover a fraction ``a`` of the image area. Options come
  from ``--set region_area=0.3 --set region_cell=4 ...`` (:data:`AUTO_OPTIONS`).
- a mask image or a folder of them (``--region FILE|DIR``, alias ``--mask``), matched by input id or stem.
- ``SCHEME:ARG`` handled by a plugin through the ``register_region_sources`` hook, e.g. a text-prompted
  segmenter (``langsam:"the dog"``); cfx ships no heavy default for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cfx_cli.errors import InputError, UsageError
from cfx_cli.images import EXTENSIONS, InputImage

#: ``--set`` keys consumed by the automatic region source (not passed to the explainer), with defaults
AUTO_OPTIONS: dict[str, Any] = {
    "region_area": 0.3,  # a: fraction of the image area to cover (RCSB code README: 0.3)
    "region_cell": 4,  # c: grid cell size in pixels (paper table: 4; code README: 16 at 256×256)
    "region_steps": 32,  # IG Riemann steps
    "region_noise": 0.05,  # noise tunnel σ (code: 0.05)
    "region_samples": 4,  # noise tunnel samples
    "region_clip": 98.0,  # percentile clipping of |attr| (code: 98)
}


class RegionSource:
    """Base class of region sources. Subclasses registered by plugins set ``scheme`` and implement
    :meth:`mask_for`; they are built as ``cls(arg, options)`` from ``--region SCHEME:ARG``."""

    scheme: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: does mask_for need the image and the classifier (``image=``, ``classifier=``)?
    needs_classifier: ClassVar[bool] = False
    #: the ``--set region_*`` options this source reads, with their defaults (others are refused)
    option_defaults: ClassVar[dict[str, Any]] = {}
    spec: str = ""

    def __init__(self, arg: str, options: dict[str, Any] | None = None) -> None:
        self.arg = arg
        self.options = dict(options or {})

    def check(self, classifier: Any) -> None:
        """Called once with the loaded classifier before any work: raise :class:`UsageError` if this source
        cannot work with it (e.g. it needs gradients from a black box)."""

    def mask_for(self, item: InputImage, size: tuple[int, int], image: np.ndarray | None = None,
                 classifier: Any = None) -> np.ndarray:
        """Binary float32 (H, W) mask for ``item`` at ``size`` (H, W); ``image`` is the (H, W, 3) float input in
        [0, 1] as the explainer will see it. Raise :class:`InputError` for a problem with this input only."""
        raise NotImplementedError


class MaskSource(RegionSource):
    """A single mask for every input, or a folder matched by input id or file stem."""

    scheme = "file"
    summary = "a mask image, or a folder of masks named after the inputs"

    def __init__(self, spec: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(spec, options)
        self.spec = spec
        self.path = Path(spec)
        if not self.path.exists():
            raise UsageError(f"--region {spec}: no such file or folder")
        self._index: dict[str, Path] = {}
        if self.path.is_dir():
            for p in sorted(self.path.rglob("*")):
                if p.suffix.lower() in EXTENSIONS:
                    self._index.setdefault(p.stem, p)

    def mask_for(self, item: InputImage, size: tuple[int, int], image=None, classifier=None) -> np.ndarray:
        """Binary float32 (H, W) mask, 1 = may change; any image mode, thresholded at 0.5."""
        from PIL import Image

        from cfx_cli.images import decode

        if self.path.is_dir():
            p = self._index.get(item.id) or self._index.get(item.path.stem)
            if p is None:
                raise InputError(f"{item.path}: no mask named {item.id}.png or {item.path.stem}.png in {self.path}")
        else:
            p = self.path
        gray = decode(p).mean(axis=2)
        h, w = size
        img = Image.fromarray((gray * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        return (np.asarray(img, dtype=np.float32) >= 127.5).astype(np.float32)


class AutoRegion(RegionSource):
    """Integrated-Gradients regions of the predicted class, grouped into grid cells (RCSB §3)."""

    scheme = "auto"
    summary = "Integrated Gradients of the predicted class, c×c cells covering a fraction a of the area"
    needs_classifier = True
    option_defaults = AUTO_OPTIONS

    def __init__(self, arg: str = "", options: dict[str, Any] | None = None) -> None:
        opts = {**AUTO_OPTIONS, **(options or {})}
        super().__init__(arg, opts)
        self.spec = "auto"
        try:
            self.area = float(opts["region_area"])
            self.cell = int(opts["region_cell"])
            self.steps = int(opts["region_steps"])
            self.noise = float(opts["region_noise"])
            self.samples = int(opts["region_samples"])
            self.clip = float(opts["region_clip"])
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--region auto: bad region option ({exc})") from None
        if not 0 < self.area <= 1:
            raise UsageError(f"--set region_area={self.area}: must be in (0, 1]")
        if self.cell < 1 or self.steps < 1 or self.samples < 1:
            raise UsageError("--set region_cell/region_steps/region_samples: must be at least 1")
        if not 0 < self.clip <= 100:
            raise UsageError(f"--set region_clip={self.clip}: a percentile in (0, 100]")
        self.options = {"region_area": self.area, "region_cell": self.cell, "region_steps": self.steps,
                        "region_noise": self.noise, "region_samples": self.samples, "region_clip": self.clip}

    def mask_for(self, item: InputImage, size: tuple[int, int], image=None, classifier=None) -> np.ndarray:
        import torch

        if image is None or classifier is None:
            raise UsageError("--region auto needs the image and a white-box classifier")
        if "gradients" not in getattr(classifier, "capabilities", ()):
            raise UsageError(f"--region auto: classifier {classifier.spec} gives no gradients (Integrated "
                             "Gradients needs a white-box classifier); pass --region FILE|DIR instead")
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        attr = integrated_gradients(classifier, x, steps=self.steps, noise=self.noise, samples=self.samples,
                                    seed=_stable_seed(item.id))
        heat = attr.abs().sum(dim=1)[0].numpy()
        return cells_covering(heat, self.area, self.cell, self.clip)


def _stable_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def integrated_gradients(classifier: Any, x, steps: int = 32, noise: float = 0.05, samples: int = 4,
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


# -- plugin region sources -----------------------------------------------------------------------------------
def plugin_region_sources() -> dict[str, type[RegionSource]]:
    """scheme → class, from the ``register_region_sources`` hook of the installed plugins."""
    from cfx_cli.plugins import get_plugin_manager

    found: dict[str, type[RegionSource]] = {}

    def register(cls: type[RegionSource]) -> None:
        if not cls.scheme or cls.scheme in ("auto", "file") or cls.scheme in found:
            return
        found[cls.scheme] = cls

    hook = getattr(get_plugin_manager().hook, "register_region_sources", None)
    if hook is not None:
        hook(register=register)
    return found


def split_region_options(set_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the explainer's --set options, the ``region_*`` ones)."""
    region = {k: v for k, v in set_options.items() if k.startswith("region_")}
    rest = {k: v for k, v in set_options.items() if not k.startswith("region_")}
    unknown = set(region) - set(AUTO_OPTIONS)
    if unknown:  # plugin sources declare theirs (option_defaults); only then is the registry consulted
        known = dict(AUTO_OPTIONS)
        for cls in plugin_region_sources().values():
            known.update(cls.option_defaults)
        unknown -= set(known)
        if unknown:
            raise UsageError(f"--set {sorted(unknown)[0]}: unknown region option (known: {', '.join(known)})")
    return rest, region


def make_region_source(spec: str, options: dict[str, Any] | None = None) -> RegionSource:
    """``auto`` → :class:`AutoRegion`; an existing path → :class:`MaskSource`; ``SCHEME:ARG`` or a bare ``SCHEME``
    (empty argument) → a plugin's."""
    if spec == "auto":
        return AutoRegion("", options)
    if Path(spec).exists():
        return MaskSource(spec, options)
    scheme, _, arg = spec.partition(":")
    sources = plugin_region_sources()
    if scheme in sources:
        src = sources[scheme](arg, options)
        src.spec = spec
        return src
    return MaskSource(spec, options)  # raises the one-line "no such file or folder"
