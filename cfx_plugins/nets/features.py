"""Batched feature extraction over a run's images, cached in ``RUN_DIR/.cache/``.

The cache file is named after the network and the identity of its weights file (path, size, mtime), and
each entry remembers the size and mtime of the image it came from, so a changed image or other weights
are recomputed, never served stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cfx_cli.atomic import atomic_write
from cfx_cli.images import resize_images


def weights_tag(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32: grey images (e.g. folders in the ACE layout from other tools) get 3 channels."""
    img = np.ascontiguousarray(img)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def image_batches(run, relpaths: list[str], size: tuple[int, int] | None, batch_size: int,
                  antialias: bool = False):
    """Yield (indices, tensor (B, 3, H, W) in [0, 1]); images are resized to ``size`` when given, else
    grouped by their own size."""
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for i, rel in enumerate(relpaths):
        img = run.image(rel)
        groups.setdefault(tuple(img.shape[:2]) if size is None else size, []).append(i)
    for _, idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            tensors = []
            for i in chunk:
                img = rgb(run.image(relpaths[i]))
                t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
                tensors.append(resize_images(t, size, antialias=antialias))
            yield chunk, torch.cat(tensors)


def cached_features(run, relpaths: list[str], cache_name: str, compute: Callable, *, size=None,
                    batch_size: int = 16, device: str = "cpu", antialias: bool = False) -> np.ndarray:
    """Features (len(relpaths), D) float64 for the run's images, computing only what the cache lacks.
    ``compute(batch)`` maps a (B, 3, H, W) tensor on ``device`` to a (B, D) tensor."""
    import torch

    cache_path = Path(run.path) / ".cache" / f"{cache_name}.npz"
    cached: dict[str, tuple[str, np.ndarray]] = {}
    if cache_path.exists():
        try:
            with np.load(cache_path, allow_pickle=False) as data:
                for p, s, f in zip(data["paths"], data["sigs"], data["feats"], strict=True):
                    cached[str(p)] = (str(s), f)
        except (OSError, ValueError, KeyError):
            cached = {}  # unreadable cache: recompute
    from cfx_cli.images import safe_child

    sigs = [_signature(safe_child(run.path, rel)) for rel in relpaths]
    todo = [i for i, rel in enumerate(relpaths) if rel not in cached or cached[rel][0] != sigs[i]]
    if todo:
        sub = [relpaths[i] for i in todo]
        with torch.no_grad():
            for chunk, batch in image_batches(run, sub, size, batch_size, antialias):
                feats = compute(batch.to(device)).detach().double().cpu().numpy()
                for j, f in zip(chunk, feats, strict=True):
                    cached[sub[j]] = (sigs[todo[j]], f)
        _save(cache_path, cached)
    return np.stack([cached[rel][1] for rel in relpaths]) if relpaths else np.zeros((0, 0))


def _save(path: Path, cached: dict[str, tuple[str, np.ndarray]]) -> None:
    keys = sorted(cached)
    try:
        with atomic_write(path) as f:
            np.savez(f, paths=np.array(keys), sigs=np.array([cached[k][0] for k in keys]),
                     feats=np.stack([cached[k][1] for k in keys]))
    except OSError:  # e.g. a read-only run directory: the features are simply not cached
        pass
