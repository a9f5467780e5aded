"""Image discovery, decoding to RGB, stable input ids and atomic PNG writes."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cfx_cli.atomic import atomic_write
from cfx_cli.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: refuse images above this many pixels before decoding them (decompression bombs)
MAX_PIXELS = 64_000_000
MAX_ID_LENGTH = 80


@dataclass(frozen=True)
class InputImage:
    id: str
    path: Path


def discover(inputs: list[str]) -> list[InputImage]:
    """Files as given, folders searched recursively; sorted, deduplicated, with unique path-safe ids."""
    found: list[tuple[str, Path]] = []  # (relative name used for the id, path)
    seen: set[Path] = set()
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise UsageError(f"input {raw}: no such file or folder")
        if root.is_dir():
            files = sorted(
                p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
            )
            prefix = root.resolve().name if len(inputs) > 1 else ""
            for p in files:
                rel = p.relative_to(root).as_posix()
                key = f"{prefix}/{rel}" if prefix else rel
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    found.append((key, p))
        else:
            if root.resolve() not in seen:
                seen.add(root.resolve())
                found.append((root.name, root))
    ids = make_ids([key for key, _ in found], [p for _, p in found])
    return [InputImage(i, p) for i, (_, p) in zip(ids, found, strict=True)]


def _slug(key: str) -> str:
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_stem.replace("/", "__")).strip("._")
    return slug[:MAX_ID_LENGTH] or "image"


def make_ids(keys: list[str], paths: list[Path]) -> list[str]:
    """Readable ids; a short hash of the relative name is added when the slug lost information or
    two inputs share a slug, so ids stay unique and stable across runs (resume relies on it)."""
    slugs = [_slug(k) for k in keys]
    counts: dict[str, int] = {}
    for s in slugs:
        counts[s] = counts.get(s, 0) + 1
    ids = []
    for key, slug in zip(keys, slugs, strict=True):
        stem = key.rsplit(".", 1)[0]
        lossless = "__" not in stem and slug == stem.replace("/", "__")
        if counts[slug] > 1 or not lossless:
            slug = f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        ids.append(slug)
    # Same relative key from two inputs (rare): disambiguate with the absolute path.
    seen: dict[str, int] = {}
    for i, (ident, path) in enumerate(zip(ids, paths, strict=True)):
        if ident in seen:
            ids[i] = f"{ident}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
        seen[ids[i]] = i
    return ids


def decode(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to float32 RGB (H, W, 3) in [0, 1].

    Handles grayscale, palette, RGBA (composited over white), 16-bit PNG and JPEG EXIF orientation.
    Raises :class:`InputError` with a one-line message naming the file and the problem.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    dims = _png_header_size(path)
    if dims is not None and dims[0] * dims[1] > max_pixels:
        raise InputError(_too_large(path, *dims, max_pixels))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise InputError(_too_large(path, w, h, max_pixels))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb_array(img)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image too large ({exc})") from None
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise InputError(f"{path}: truncated image data") from None
        raise InputError(f"{path}: cannot decode ({msg})") from None
    except (ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot decode ({exc})") from None


def _too_large(path: Path, w: int, h: int, max_pixels: int) -> str:
    return (f"{path}: image too large ({w}×{h} = {w * h / 1e6:.0f} MP, limit {max_pixels / 1e6:.0f} MP); "
            "refusing to decode it")


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR, read before decoding (a bomb may have no usable data)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _to_rgb_array(img) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit PNGs decode as "I" or "I;16"; 8-bit values never exceed 255.
        scale = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        gray = np.clip(arr / scale, 0, 1).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def resize(array: np.ndarray, size: tuple[int, int] | None, nearest: bool = False) -> np.ndarray:
    """Resize (H, W, C) float [0, 1] to (H', W') with antialiased bicubic, as most pipelines do (``nearest``: for
    masks)."""
    from PIL import Image

    if size is None or array.shape[:2] == tuple(size):
        return array
    h, w = size
    method = Image.NEAREST if nearest else Image.BICUBIC
    channels = [
        np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F").resize((w, h), method))
        for c in range(array.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0, 1).astype(np.float32)


def crop_box(source: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The geometry of :func:`fit_to_size` for a ``source`` (H, W) image: the size it is resized to (its short
    side to the target's, as torchvision's ``Resize(int)``) and the centre crop (top, left, H, W) taken from that
    (torchvision's ``CenterCrop`` rounding)."""
    (h, w), (th, tw) = source, size
    if th * w >= tw * h:  # the height is the binding side
        rh, rw = th, max(tw, int(th * w / h))
    else:
        rh, rw = max(th, int(tw * h / w)), tw
    return (rh, rw), (int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0)), th, tw)


def fit_to_size(array: np.ndarray, size: tuple[int, int] | None, nearest: bool = False) -> np.ndarray:
    """Bring a decoded (H, W, C) image from its native resolution to a generator's working ``size``: resize the
    short side, then centre-crop — the papers' data loaders (``Resize(s)`` + ``CenterCrop(s)``) — so the aspect
    ratio is kept. A no-op at that size or with ``size`` None (work at the native resolution)."""
    if size is None or array.shape[:2] == tuple(size):
        return array
    resized, (top, left, th, tw) = crop_box(array.shape[:2], tuple(size))
    return np.ascontiguousarray(resize(array, resized, nearest=nearest)[top:top + th, left:left + tw])


def to_working_size(array: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, list[int] | None]:
    """A decoded input at the working ``size`` (short-side resize + centre crop), quantised as the saved original
    will be so the manifest describes the files on disk; and, when the crop dropped pixels, the part of the input
    kept as [top, left, H, W] in the input's own pixels."""
    crop = None
    if size is not None and array.shape[:2] != tuple(size):
        (sh, sw), ((rh, rw), (top, left, th, tw)) = array.shape[:2], crop_box(array.shape[:2], size)
        if (rh, rw) != tuple(size):
            crop = [round(top * sh / rh), round(left * sw / rw), round(th * sh / rh), round(tw * sw / rw)]
    return to_uint8(fit_to_size(array, size)).astype(np.float32) / 255.0, crop


#: a resize beyond these is worth a warning (issue 18): the explanation is then of a very different picture
RESIZE_FACTOR_WARN = 4.0
ASPECT_CHANGE_WARN = 0.10


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of an image as :func:`decode` will return it (EXIF orientation applied), from its header only;
    None when it cannot be read (decoding reports that input's error later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                w, h = h, w
            return h, w
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def resize_problem(source: tuple[int, int] | None, target: tuple[int, int] | None,
                   who: str = "the method's working size") -> str | None:
    """Why bringing ``source`` (H, W) to ``target`` with :func:`fit_to_size` deserves a warning — scaled by more
    than 4× (up or down) or aspect ratio changed by more than 10 % (then the centre crop drops a part of the
    image) — or None. ``who`` names the target size in the message."""
    if source is None or target is None or min(source) < 1 or min(target) < 1:
        return None
    (sh, sw), (th, tw) = source, target
    scale = max(th / sh, tw / sw)  # the short-side resize of fit_to_size
    factor = max(scale, 1 / scale)
    aspect = (tw / th) / (sw / sh)
    reasons = []
    if factor > RESIZE_FACTOR_WARN:
        reasons.append(f"{factor:.3g}× {'larger' if scale > 1 else 'smaller'}")
    if max(aspect, 1 / aspect) - 1 > ASPECT_CHANGE_WARN:
        reasons.append(f"aspect ratio {sw / sh:.2f} → {tw / th:.2f}: centre-cropped")
    if not reasons:
        return None
    return (f"resized from {sw}×{sh} to {who} {tw}×{th} ({', '.join(reasons)}); the explanation is of the "
            "resized image")


def resize_crop_images(images: torch.Tensor, short_side: int, size: tuple[int, int]) -> torch.Tensor:
    """A classifier's ``Resize(short_side)`` + ``CenterCrop(size)`` (torchvision's sizes and crop rounding) on an
    (N, C, H, W) batch, differentiably: the ImageNet evaluation transform (256 → 224) inside the white-box call."""
    h, w = images.shape[-2:]
    if h <= w:
        rh, rw = short_side, int(short_side * w / h)
    else:
        rh, rw = int(short_side * h / w), short_side
    th, tw = size
    if th > rh or tw > rw:
        raise ValueError(f"crop {th}×{tw} is larger than the {rh}×{rw} resize")
    resized = resize_images(images, (rh, rw))
    top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))
    return resized[..., top:top + th, left:left + tw]


def resize_images(images: torch.Tensor, size: tuple[int, int] | None, nearest: bool = False,
                  antialias: bool = True) -> torch.Tensor:
    """Resize an (N, C, H, W) tensor batch between the sizes of the models and the classifier (a no-op at the same
    size or ``size`` None): bilinear (``align_corners=False``), antialiased unless ``antialias=False``, or nearest
    for masks. Inputs read from disk are resized once, with :func:`resize` (PIL bicubic), before any model sees
    them; every later change of resolution goes through this function."""
    import torch.nn.functional as F

    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    if nearest:
        return F.interpolate(images, size=tuple(size), mode="nearest")
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)


def to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write (H, W, 3) / (H, W) float [0, 1] or uint8 as PNG atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array if array.dtype == np.uint8 else to_uint8(array)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    with atomic_write(path) as f:
        Image.fromarray(data).save(f, format="PNG")


def load_png(path: str | Path) -> np.ndarray:
    """Read back a PNG written by cfx as float32 (H, W, 3) in [0, 1] (masks: (H, W, 1))."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode == "L":
            return (np.asarray(img, dtype=np.float32) / 255.0)[..., None]
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def safe_child(root: Path, *parts: str) -> Path:
    """``root/parts`` guaranteed to stay inside ``root`` (ids are slugs, but check anyway)."""
    candidate = root.joinpath(*parts).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write outside the run directory: {candidate}")
    return candidate
