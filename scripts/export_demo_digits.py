"""Write the demo digits split as PNGs (e.g. training images for `cfx fit time --data DIR`).

    python scripts/export_demo_digits.py --out DIR [--split train|test] [--limit N]

Files are named ``SPLIT-INDEX-labelK.png`` (16×16 RGB, the demo classifier's input); the label in the name is
the dataset's, which `cfx fit time` ignores (it asks the classifier).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()

    from cfx_cli.demo.data import load_split
    from cfx_cli.images import save_png

    x_tr, y_tr, x_te, y_te = load_split()
    x, y = (x_tr, y_tr) if args.split == "train" else (x_te, y_te)
    n = len(x) if args.limit is None else min(args.limit, len(x))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_png(x[i].transpose(1, 2, 0), out / f"{args.split}-{i:04d}-label{int(y[i])}.png")
    print(f"wrote {n} images to {out}")


if __name__ == "__main__":
    main()
