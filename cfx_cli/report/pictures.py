"""The report's derived pictures: amplified difference heatmap and mask/change overlay of each record,
written once into ``RUN_DIR/report/{diff,overlay}/`` and reused while they are newer than their sources."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from cfx_cli.images import load_png, safe_child, save_png
from cfx_cli.runs import write_json_atomic

DERIVED_DIR = "report"
_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
#: RdBu-like diverging colour map: darker in the counterfactual → blue, brighter → red
_CMAP_X = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_CMAP_RGB = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]],
                     dtype=np.float32) / 255.0
_MASK_TINT = np.array([1.0, 0.62, 0.0], dtype=np.float32)  # amber
_CHANGE_TINT = np.array([0.85, 0.1, 0.1], dtype=np.float32)


def file_stem(ident: str) -> str:
    """A file name for a record id: the id itself when it is a plain slug (what ``cfx explain``
    writes), else a hash, so hostile ids from a hand-edited manifest never shape a path."""
    if _SAFE_STEM.fullmatch(ident) and ".." not in ident:
        return ident
    return "id-" + hashlib.sha256(ident.encode("utf-8")).hexdigest()[:20]


def _luminance(img: np.ndarray) -> np.ndarray:
    return img.mean(axis=2) if img.shape[2] != 1 else img[..., 0]


def diff_heatmap(original: np.ndarray, counterfactual: np.ndarray) -> tuple[np.ndarray, float]:
    """Signed luminance change as an RdBu picture, amplified so that the 99th percentile of |Δ|
    saturates (at most ×255: a change below one grey level is never blown up to full colour)."""
    delta = _luminance(counterfactual) - _luminance(original)
    scale = max(float(np.percentile(np.abs(delta), 99)), 1.0 / 255.0)
    t = np.clip(delta / scale, -1.0, 1.0)
    rgb = np.stack([np.interp(t, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], axis=2)
    return rgb.astype(np.float32), 1.0 / scale


def mask_overlay(original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The region allowed to change in colour with an amber tint; the rest greyed and dimmed."""
    m = (mask[..., 0] if mask.ndim == 3 else mask) >= 0.5
    gray = np.repeat(_luminance(original)[..., None], 3, axis=2)
    out = 0.25 + 0.45 * gray
    tinted = 0.6 * original + 0.4 * _MASK_TINT
    out[m] = tinted[m]
    return out.astype(np.float32)


def change_overlay(original: np.ndarray, counterfactual: np.ndarray, gain: float) -> np.ndarray:
    """No mask: the size of the change painted in red over the greyed original."""
    mag = np.clip(np.abs(_luminance(counterfactual) - _luminance(original)) * gain, 0.0, 1.0)
    gray = np.repeat(_luminance(original)[..., None], 3, axis=2)
    base = 0.2 + 0.55 * gray
    alpha = (0.75 * mag)[..., None]
    return (base * (1 - alpha) + _CHANGE_TINT * alpha).astype(np.float32)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header only."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def relative_url(path: Path, base: Path) -> str:
    """Relative, percent-encoded link from the folder ``base`` to ``path``."""
    return quote(Path(os.path.relpath(path.resolve(), base.resolve())).as_posix(), safe="/")


class RunPictures:
    """Derived pictures of one run: ``report/{diff,overlay}/STEM.png`` plus ``report/index.json``,
    which remembers ℓ1, gain and size per record with the sources' (mtime, size), so that a report
    rewritten over an unchanged run decodes no image at all."""

    INDEX = "index.json"

    def __init__(self, run_path: Path, base: Path) -> None:
        self.root = run_path.resolve()
        self.base = str(base.resolve())
        # resolved and checked once; the stems joined below are slugs or hashes (no separators)
        self.diff_dir = safe_child(self.root, DERIVED_DIR, "diff")
        self.overlay_dir = safe_child(self.root, DERIVED_DIR, "overlay")
        self.index_path = safe_child(self.root, DERIVED_DIR, self.INDEX)
        self.old: dict = {}
        try:
            loaded = json.loads(self.index_path.read_text(encoding="utf-8"))
            entries = loaded.get("entries") if isinstance(loaded, dict) else None
            if isinstance(entries, dict) and loaded.get("version") == 1:
                self.old = entries
        except (OSError, ValueError):
            pass
        self.new: dict = {}

    def url(self, path: Path) -> str:
        """Relative, percent-encoded link from the report's folder to an already resolved ``path``."""
        return quote(Path(os.path.relpath(path, self.base)).as_posix(), safe="/")

    def inside(self, rel: Any) -> Path | None:
        """``RUN_DIR/rel`` if it names an existing file inside the run directory; None otherwise."""
        if not rel or not isinstance(rel, str):
            return None
        try:
            path = safe_child(self.root, rel)
        except ValueError:
            return None
        return path if path.is_file() else None

    def derive(self, ident: str, orig: Path, cf: Path, mask: Path | None) -> dict:
        """Write (or reuse) the difference heatmap and overlay of one record."""
        stem = file_stem(ident)
        diff_path, overlay_path = self.diff_dir / f"{stem}.png", self.overlay_dir / f"{stem}.png"
        sources = [orig, cf] + ([mask] if mask else [])
        stats = [p.stat() for p in sources]
        sig = [[st.st_mtime_ns, st.st_size] for st in stats]
        newest = max(st.st_mtime_ns for st in stats)
        entry = self.old.get(stem)
        if (entry and entry.get("sig") == sig and entry.get("overlay") == ("mask" if mask else "change")
                and _newer(diff_path, newest) and _newer(overlay_path, newest)):
            self.new[stem] = entry
            return entry
        a, b = load_png(orig), load_png(cf)
        if a.shape != b.shape:
            raise ValueError(f"original {a.shape[1]}×{a.shape[0]} and counterfactual "
                             f"{b.shape[1]}×{b.shape[0]} differ in size")
        heat, gain = diff_heatmap(a, b)
        if mask is not None:
            m = load_png(mask)
            if m.shape[:2] != a.shape[:2]:
                raise ValueError(f"mask {m.shape[1]}×{m.shape[0]} does not match the image size")
            overlay = mask_overlay(a, m)
        else:
            overlay = change_overlay(a, b, gain)
        save_png(heat, diff_path)
        save_png(overlay, overlay_path)
        entry = {
            "sig": sig, "overlay": "mask" if mask else "change",
            "l1": round(float(np.abs(b - a).mean()), 6),  # the same per-pixel ℓ1 as the `distance` metric
            "gain": round(gain, 2), "w": int(a.shape[1]), "h": int(a.shape[0]),
        }
        self.new[stem] = entry
        return entry

    def save_index(self) -> None:
        if self.new != self.old:
            write_json_atomic(self.index_path, {"version": 1, "entries": self.new})


def _newer(path: Path, than_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns >= than_ns
    except OSError:
        return False
