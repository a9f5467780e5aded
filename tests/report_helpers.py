"""Helpers for the report tests: synthetic run directories made in milliseconds (no classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

STATUSES = ("flipped", "not_flipped", "skipped", "error")


def record(ident: str, status: str = "flipped", **extra) -> dict:
    rec = {
        "id": ident, "source": f"inputs/{ident}.png", "status": status, "error": None,
        "source_label": "cat", "source_prob": 0.9, "target_label": "dog", "target_prob_before": 0.05,
        "target_prob_after": None, "cf_label": None, "counterfactual": None, "original": None, "mask": None,
        "params": None, "seed": 0, "seconds": None, "nfe": None,
    }
    rec.update(extra)
    return rec


def write_run(root: Path, records: list[dict], info: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (root / "run.json").write_text(json.dumps(info or {"method": "synthetic", "target": "auto"}),
                                   encoding="utf-8")
    return root


def save(root: Path, rel: str, array: np.ndarray) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return rel


def synthetic_run(root: Path, n: int, seed: int = 0, size: int = 16, labels: int = 10,
                  prefix: str = "img") -> Path:
    """``n`` records cycling through the four statuses, with real PNGs: what a big run looks like."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        ident = f"{prefix}-{i:05d}"
        status = STATUSES[i % 4]
        rec = record(ident, status, source_label=str(i % labels), target_label=str((i + 1) % labels),
                     source_prob=round(float(rng.uniform(0.5, 1.0)), 4), seed=i)
        if status == "error":
            rec["error"] = f"inputs/{ident}.png: truncated image data"
            records.append(rec)
            continue
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        rec["original"] = save(root, f"originals/{ident}.png", a)
        if status in ("flipped", "not_flipped"):
            b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
            rec.update(counterfactual=save(root, f"counterfactuals/{ident}.png", b),
                       target_prob_after=round(float(rng.random()), 4),
                       cf_label=rec["target_label"] if status == "flipped" else rec["source_label"],
                       params={"eps": 0.1, "tau": i % 3}, seconds=0.25, nfe=10)
        records.append(rec)
    return write_run(root, records)
