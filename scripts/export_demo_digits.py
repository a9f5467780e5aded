"""Write demo digits as PNGs (e.g. training images for `cfx fit time --data DIR`, or a protocol split to explain).

    python scripts/export_demo_digits.py --out DIR [--split train|held-out|tuning|test|readme] [--limit N]

``train`` and ``held-out`` are the two halves of ``cfx_cli.demo.data.load_split``; ``tuning``, ``test`` and
``readme`` are the demo protocol's splits of the held-out digits (docs/demo-protocol.md). Files are named
``SPLIT-INDEX-labelK.png`` (16×16 RGB, the demo classifier's input), INDEX the digit's index in its half (for
the protocol splits: in the held-out half); the label in the name is the dataset's, which `cfx fit time`
ignores (it asks the classifier).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SPLITS = ("train", "held-out", "tuning", "test", "readme")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    from cfx_cli.demo.data import export_split

    paths = export_split(args.split, Path(args.out), args.limit)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
