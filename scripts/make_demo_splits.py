"""Write ``cfx_cli/demo/splits.json``: the demo protocol's tuning and test splits of the held-out digits.

    python scripts/make_demo_splits.py [--check]

The 450 held-out digits of ``cfx_cli.demo.data.load_split`` (never seen by any demo model, which all train on the
other 1347) minus the 16 README images in ``cfx_cli/demo/images`` (found by their pixels) are split, stratified by
label with seed 0, into a test split of 256 and a tuning split of the rest (178). Within each split the order
interleaves the labels (0, 1, …, 9, 0, 1, …), each label's digits in a seeded shuffle, so the first N of a split are
as balanced as N allows. ``--check`` recomputes and exits 1 when the committed file differs. docs/demo-protocol.md
describes the protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfx_cli.demo import IMAGES_DIR  # noqa: E402
from cfx_cli.demo.data import SPLITS_FILE, load_split  # noqa: E402
from cfx_cli.images import load_png, to_uint8  # noqa: E402

SEED = 0
TEST_SIZE = 256


def readme_indices(x_te: np.ndarray) -> list[int]:
    """Held-out index of each README image (its 8-bit pixels equal the held-out digit's)."""
    held = to_uint8(x_te.transpose(0, 2, 3, 1))
    found = []
    for path in sorted(IMAGES_DIR.glob("*.png")):
        img = to_uint8(load_png(path))
        hits = np.flatnonzero((held == img[None]).all(axis=(1, 2, 3)))
        if len(hits) != 1:
            sys.exit(f"{path}: matches {len(hits)} held-out digits, expected exactly one")
        found.append(int(hits[0]))
    return found


def interleave(indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Round-robin over the labels, each label's indices shuffled."""
    per = {k: list(rng.permutation(indices[labels[indices] == k])) for k in sorted(set(labels[indices]))}
    out: list[int] = []
    while any(per.values()):
        for k in per:
            if per[k]:
                out.append(int(per[k].pop(0)))
    return out


def build() -> dict:
    from sklearn.model_selection import train_test_split

    _, _, x_te, y_te = load_split()
    readme = readme_indices(x_te)
    pool = np.setdiff1d(np.arange(len(y_te)), readme)
    tuning, test = train_test_split(pool, test_size=TEST_SIZE, stratify=y_te[pool], random_state=SEED)
    rng = np.random.default_rng(SEED)
    return {
        "about": "indices into the held-out digits of cfx_cli.demo.data.load_split (docs/demo-protocol.md); "
                 "written by scripts/make_demo_splits.py",
        "seed": SEED,
        "held_out": int(len(y_te)),
        "readme": readme,
        "tuning": interleave(np.sort(tuning), y_te, rng),
        "test": interleave(np.sort(test), y_te, rng),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = ap.parse_args()
    data = build()
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n"
    if args.check:
        same = SPLITS_FILE.read_text(encoding="utf-8") == text
        print(f"{SPLITS_FILE}: {'up to date' if same else 'differs from a fresh derivation'}")
        return 0 if same else 1
    SPLITS_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {SPLITS_FILE}: tuning {len(data['tuning'])}, test {len(data['test'])}, "
          f"readme {len(data['readme'])} of {data['held_out']} held-out digits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
