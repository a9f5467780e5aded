"""What ``cfx.explain`` returns: one :class:`Result` per input (the manifest record and its images, in memory)
and :class:`Results`, a list of them with the run's ``run.json``, a grid image and a notebook view."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: the grid's and the notebook view's cells are at least this many pixels high (small images are enlarged)
MIN_CELL = 96


@dataclass
class Result:
    """One input's outcome. The manifest record's fields are attributes (``r.status``, ``r.target_label``,
    ``r.target_prob_after``, ``r.params``, ...; the whole line is ``r.record``), except ``counterfactual``,
    ``original`` and ``mask``, which are the images as tensors (their file paths are in ``r.record``)."""

    record: dict[str, Any]
    original_image: Image.Image | None = None  # the input as explained: at the working size, 8-bit
    counterfactual_image: Image.Image | None = None
    mask_image: Image.Image | None = None  # the region the method was allowed to change, if any

    def __getattr__(self, name: str) -> Any:
        from cfx_cli.runs import RECORD_FIELDS  # numpy: cfx_cli.runs reads images

        if not name.startswith("_") and name in RECORD_FIELDS:
            return self.__dict__["record"].get(name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    @property
    def flipped(self) -> bool:
        return self.record.get("status") == "flipped"

    @property
    def counterfactual(self) -> torch.Tensor | None:
        """The counterfactual, (3, H, W) float32 in [0, 1] (exactly the saved PNG), or None (error, skipped)."""
        return _tensor(self.counterfactual_image)

    @property
    def original(self) -> torch.Tensor | None:
        """The input as explained, (3, H, W) float32 in [0, 1]."""
        return _tensor(self.original_image)

    @property
    def mask(self) -> torch.Tensor | None:
        """The region, (H, W) float32 in [0, 1] (1 = may change), or None without a region."""
        t = _tensor(self.mask_image)
        return None if t is None else t[0]

    @property
    def difference_image(self) -> Image.Image | None:
        """|counterfactual − original| averaged over channels, scaled so its largest value is white."""
        if self.counterfactual_image is None or self.original_image is None:
            return None
        import numpy as np
        from PIL import Image

        a = np.asarray(self.counterfactual_image, dtype=np.float32)
        b = np.asarray(self.original_image, dtype=np.float32)
        d = np.abs(a - b).mean(axis=2)
        d = d / d.max() if d.max() > 0 else d
        return Image.fromarray((d * 255 + 0.5).astype(np.uint8), mode="L").convert("RGB")

    def __repr__(self) -> str:
        r = self.record
        if r.get("status") in ("flipped", "not_flipped"):
            return (f"Result({r['id']!r}, {r['status']}, {r.get('source_label')} → {r.get('target_label')}: "
                    f"p {r.get('target_prob_before'):.3f} → {r.get('target_prob_after'):.3f})")
        return f"Result({r.get('id')!r}, {r.get('status')}{': ' + r['error'] if r.get('error') else ''})"


@dataclass(repr=False)
class Results(Sequence[Result]):
    """The results of one run, in input order: a list of :class:`Result` (index, iterate, ``len``), with
    ``run_dir`` (the run directory; a temporary one, removed with this object, when ``out`` was not given),
    ``info`` (its ``run.json``), ``counts`` (status → number), :meth:`grid` and a notebook view."""

    items: list[Result]
    run_dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    _keep: list[Any] = field(default_factory=list)  # the in-memory classifier, if any (cfx.evaluate reloads it)

    @classmethod
    def load(cls, run_dir: str | Path) -> Results:
        """Read a run directory written by ``cfx explain`` or ``cfx.explain(..., out=...)`` into memory."""
        from cfx_cli.runs import RunData  # numpy: only when a run is read

        run = RunData.load(run_dir)
        items = [Result(rec, *(_load(run.path, rec.get(k)) for k in ("original", "counterfactual", "mask")))
                 for rec in run.records]
        return cls(items, run.path, run.info)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.items:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def counterfactuals(self) -> torch.Tensor:
        """The counterfactuals of the explained inputs stacked, (N, 3, H, W) (all of one size)."""
        import torch

        return torch.stack([r.counterfactual for r in self.items if r.counterfactual_image is not None])

    def by_id(self, ident: str) -> Result:
        for r in self.items:
            if r.id == ident:
                return r
        raise KeyError(ident)

    @overload
    def __getitem__(self, index: int) -> Result: ...
    @overload
    def __getitem__(self, index: slice) -> list[Result]: ...
    def __getitem__(self, index):
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Result]:
        return iter(self.items)

    def __repr__(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return f"Results({self.info.get('method')}, {len(self)} inputs: {counts or 'none'}; {self.run_dir})"

    def grid(self, cell: int | None = None) -> Image.Image:
        """One row per input: original | counterfactual | difference (blank where there is none), as a PIL
        image. ``cell``: the height of a cell in pixels (default: the image height, at least 96)."""
        from PIL import Image

        rows = [(r.original_image, r.counterfactual_image, r.difference_image) for r in self.items]
        sizes = [im.size for row in rows for im in row if im is not None]
        if not sizes:
            return Image.new("RGB", (1, 1), "white")
        h = cell or max(MIN_CELL, max(s[1] for s in sizes))
        w = max(round(s[0] * h / s[1]) for s in sizes)
        gap = 4
        grid = Image.new("RGB", (3 * w + 2 * gap, len(rows) * h + (len(rows) - 1) * gap), "white")
        for i, row in enumerate(rows):
            for j, im in enumerate(row):
                if im is not None:
                    grid.paste(_fit(im, w, h), (j * (w + gap), i * (h + gap)))
        return grid

    def _repr_html_(self) -> str:
        """A table for Jupyter: id, status, labels and probabilities, original | counterfactual | difference."""
        head = "".join(f"<th>{t}</th>" for t in ("id", "status", "source → target", "p(target)", "original",
                                                  "counterfactual", "difference"))
        body = []
        for r in self.items:
            rec = r.record
            probs = ""
            if rec.get("target_prob_before") is not None and rec.get("target_prob_after") is not None:
                probs = f"{rec['target_prob_before']:.3f} → {rec['target_prob_after']:.3f}"
            labels = f"{rec.get('source_label') or ''} → {rec.get('target_label') or ''}"
            status = rec.get("status") or ""
            if rec.get("error"):
                status += f": {rec['error']}"
            cells = [rec.get("id", ""), status, labels, probs]
            imgs = [_img_tag(im) for im in (r.original_image, r.counterfactual_image, r.difference_image)]
            body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                        + "".join(f"<td>{t}</td>" for t in imgs) + "</tr>")
        caption = html.escape(repr(self))
        return (f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>")


def _load(run_dir: Path, relpath: str | None) -> Image.Image | None:
    if not relpath:
        return None
    from PIL import Image

    from cfx_cli.images import safe_child

    with Image.open(safe_child(run_dir, relpath)) as im:
        im.load()
        return im.copy()


def _tensor(image: Image.Image | None) -> torch.Tensor | None:
    if image is None:
        return None
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _fit(image: Image.Image, w: int, h: int) -> Image.Image:
    from PIL import Image

    im = image.convert("RGB")
    if im.size == (w, h):
        return im
    scale = min(w / im.width, h / im.height)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)


def _img_tag(image: Image.Image | None) -> str:
    if image is None:
        return ""
    h = max(MIN_CELL, image.height)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" height="{h}" '
            'style="image-rendering: pixelated" alt="">')

