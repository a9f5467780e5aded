"""The demo benchmark: every method on held-out digits of the demo protocol (docs/demo-protocol.md).

    python bench/demo_benchmark.py [--split test|tuning] [--n N] [--methods pgd,dime,...] [--out DIR]
                                   [--set METHOD:KEY=VALUE ...]

Writes the first N digits of the split (default: all 256 of ``test``) as PNGs, runs each method on them as
``cfx explain DIR --method M --target auto --seed 0`` (default presets, one process per method), evaluates each
run with ``cfx eval``'s metrics (the demo's own judges: no download) and prints, per method:

- ``flip``: flip rate of the explained classifier (demo:digits);
- ``oracle``: oracle flip rate, the share of counterfactuals the independent judges read as the target digit
  (mean of ``mlp`` and ``rff``: demo:oracle-mlp, demo:oracle-rff);
- ``l1``: mean per-pixel ℓ1 between original and counterfactual; ``l1_nn``: mean ℓ1 between the original and
  the nearest training digit of the target class (a real digit of the target); ``l1/nn``: their ratio (< 1:
  the edits are smaller than swapping in the nearest real target digit);
- ``fid``: cfx eval's FID on the demo features (originals vs successful counterfactuals, ACE's protocol);
  ``fid_train``: successful counterfactuals vs the 1347 training digits (do they look like digits at all?);
  ``fid_tgt``: successful counterfactuals vs the training digits of their target classes, in the same class
  proportions (do they look like real digits *of the target*? an attack that leaves the source digit in place
  scores badly here, while the plain FID rewards it for staying close to the originals);
- ``s/expl`` and ``nfe``: seconds and network evaluations per explanation (this machine, ``--threads``).

After the methods, the row ``real-nn`` is a reference, not a method: every input's "counterfactual" is the
nearest training digit of its target class (the ``l1_nn`` digit, swapped in whole), judged by the same metrics
(the flip by demo:digits on the saved 8-bit digit). It shows what a perfect redraw of the digit scores: on the
plain ``fid`` (originals vs counterfactuals) even real target digits score far above an attack that leaves the
source digits in place, so that column cannot tell a counterfactual from an adversarial example.

``--set dime:tau=30`` passes ``--set tau=30`` to that method's ``cfx explain`` only (for tuning; the table's
header then names the settings instead of "default presets"). The JSON (``OUT/benchmark.json``) holds every
number, the command and the run folders. Tuning presets is done on ``--split tuning``; numbers reported in docs
come from ``--split test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cfx_cli.demo.classifier import load_pretrained
from cfx_cli.demo.data import export_split, load_split
from cfx_cli.evaluate import evaluate
from cfx_cli.images import load_png, save_png, to_uint8
from cfx_plugins.metrics.fid import fid_from_features, frechet_distance, gaussian_stats
from cfx_plugins.nets.digits import demo_features

METHODS = ("pgd", "dime", "fastdime", "ace", "rcsb", "time", "eced")
METRICS = "flip_rate,distance,efficiency,fid,oracle_flip_rate"
COLUMNS = (("flip", "flip_rate", "{:.0%}"), ("oracle", "oracle_flip_rate", "{:.0%}"),
           ("mlp", "oracle_flip_rate_mlp", "{:.0%}"), ("rff", "oracle_flip_rate_rff", "{:.0%}"),
           ("l1", "l1", "{:.3f}"), ("l1_nn", "l1_nearest", "{:.3f}"), ("l1/nn", "l1_ratio", "{:.2f}"),
           ("fid", "fid", "{:.1f}"), ("fid_train", "fid_train", "{:.1f}"), ("fid_tgt", "fid_target", "{:.1f}"),
           ("s/expl", "seconds", "{:.2f}"),
           ("nfe", "nfe", "{:.0f}"))


def training_digits() -> tuple[np.ndarray, np.ndarray]:
    """The demo training digits as the runs store images: (N, 16, 16, 3) 8-bit values in [0, 1], labels."""
    x_tr, y_tr, _, _ = load_split()
    return to_uint8(x_tr.transpose(0, 2, 3, 1)) / 255.0, y_tr


def nearest_target(originals: np.ndarray, targets: list[str], train_x: np.ndarray,
                   train_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per input: the training digit of its target class nearest in per-pixel ℓ1, and that ℓ1."""
    digits, dists = [], []
    for img, t in zip(originals, targets, strict=True):
        pool = train_x[train_y == int(t)]
        d = np.abs(pool - img[None]).mean(axis=(1, 2, 3))
        digits.append(pool[int(d.argmin())])
        dists.append(float(d.min()))
    return np.stack(digits), np.array(dists)


def nearest_target_l1(originals: np.ndarray, targets: list[str], train_x: np.ndarray,
                      train_y: np.ndarray) -> np.ndarray:
    """Per input: the per-pixel ℓ1 from the original to the nearest training digit of its target class."""
    return nearest_target(originals, targets, train_x, train_y)[1]


def reference_run(template: Path, dest: Path, train_x: np.ndarray, train_y: np.ndarray) -> Path:
    """A run folder like ``template`` (same inputs, targets and run.json) whose counterfactuals are the nearest
    target-class training digits, each flagged flipped when demo:digits assigns the saved digit to its target."""
    recs = [json.loads(line) for line in (template / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    recs = [r for r in recs if r["status"] in ("flipped", "not_flipped")]
    originals = np.stack([load_png(template / r["original"]) for r in recs])
    swapped, _ = nearest_target(originals, [r["target_label"] for r in recs], train_x, train_y)
    cnn = load_pretrained()
    shutil.rmtree(dest, ignore_errors=True)
    with torch.no_grad():
        labels = cnn(torch.from_numpy(swapped.transpose(0, 3, 1, 2)).float()).argmax(1).tolist()
    for sub in ("originals", "counterfactuals"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for rec, orig, cf, label in zip(recs, originals, swapped, labels, strict=True):
        save_png(orig, dest / rec["original"])
        save_png(cf, dest / rec["counterfactual"])
        flipped = str(label) == rec["target_label"]
        lines.append(json.dumps({**rec, "status": "flipped" if flipped else "not_flipped", "cf_label": str(label),
                                 "mask": None, "params": {"reference": "nearest target-class training digit"},
                                 "seconds": 0.0, "nfe": 0}))
    (dest / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (dest / "run.json").write_text((template / "run.json").read_text(encoding="utf-8"), encoding="utf-8")
    return dest


def features(images: np.ndarray) -> np.ndarray:
    compute = demo_features()[0]
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
        return np.concatenate([compute(x[i:i + 256]).double().numpy() for i in range(0, len(x), 256)])


def target_matched_fid(train_feats: np.ndarray, train_y: np.ndarray, feats: np.ndarray,
                       targets: list[str]) -> float:
    """FID of ``feats`` against the training digits reweighted to the targets' class proportions: each training
    digit of class c weighs (share of c among the targets) / (number of training digits of c)."""
    counts = np.bincount(np.array([int(t) for t in targets]), minlength=10)
    weights = counts[train_y] / np.bincount(train_y, minlength=10)[train_y]
    weights = weights / weights.sum()
    mu = weights @ train_feats
    centred = train_feats - mu
    sigma = (centred * weights[:, None]).T @ centred / (1 - (weights ** 2).sum())
    return frechet_distance(mu, sigma, *gaussian_stats(feats))


def run_method(method: str, inputs: Path, out: Path, threads: int,
               settings: list[str] | None = None) -> tuple[int, str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "cfx_cli", "explain", str(inputs), "--method", method, "--target", "auto",
           "--seed", "0", "--out", str(out), "--overwrite"]
    for setting in settings or []:
        cmd += ["--set", setting]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return proc.returncode, proc.stderr.strip()[-2000:], time.time() - t0


def measure(run: Path, train_x: np.ndarray, train_y: np.ndarray, train_feats: np.ndarray) -> dict:
    result = evaluate([str(run)], METRICS)
    name = result.runs[0]
    row = {k: v for k, v in result.rows[name].items()}
    row["skipped"] = result.skipped.get(name, {})
    recs = [json.loads(line) for line in (run / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    recs = [r for r in recs if r["status"] in ("flipped", "not_flipped")]
    originals = np.stack([load_png(run / r["original"]) for r in recs])
    nn_l1 = nearest_target_l1(originals, [r["target_label"] for r in recs], train_x, train_y)
    row["l1_nearest"] = float(nn_l1.mean())
    row["l1_ratio"] = float(row["l1"] / row["l1_nearest"]) if row.get("l1") is not None else None
    ok = [r for r in recs if r["status"] == "flipped"]
    row["fid_train"] = row["fid_target"] = None
    if len(ok) >= 2:
        cf_feats = features(np.stack([load_png(run / r["counterfactual"]) for r in ok]))
        row["fid_train"] = fid_from_features(train_feats, cf_feats)
        row["fid_target"] = target_matched_fid(train_feats, train_y, cf_feats, [r["target_label"] for r in ok])
    return row


def table(rows: dict[str, dict]) -> str:
    head = f"{'method':<7}" + "".join(f"{label:>10}" for label, _, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for method, row in rows.items():
        if "error" in row:
            lines.append(f"{method:<7}  failed: {row['error'].splitlines()[-1] if row['error'] else '?'}")
            continue
        cells = [("–" if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in COLUMNS]
        lines.append(f"{method:<7}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("test", "tuning"), default="test")
    ap.add_argument("--n", type=int, default=None, help="the first N digits of the split (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path("cfx-runs/demo-benchmark"))
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of each cfx explain")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="pass --set KEY=VALUE to METHOD's cfx explain (repeatable; for tuning, not for reporting)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings: dict[str, list[str]] = {}
    for item in args.settings:
        method, sep, kv = item.partition(":")
        if not sep or "=" not in kv or method not in methods:
            ap.error(f"--set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(methods)}")
        settings.setdefault(method, []).append(kv)
    out = args.out / args.split
    inputs = out / "inputs"
    if inputs.exists():
        for old in inputs.glob("*.png"):
            old.unlink()
    files = export_split(args.split, inputs, args.n)
    train_x, train_y = training_digits()
    train_feats = features(train_x)
    rows: dict[str, dict] = {}
    for method in methods:
        rc, err, wall = run_method(method, inputs, out / method, args.threads, settings.get(method))
        if rc not in (0, 1):
            rows[method] = {"error": err, "returncode": rc}
        else:
            rows[method] = {**measure(out / method, train_x, train_y, train_feats), "wall_seconds": round(wall, 1),
                            "run": str(out / method)}
        print(f"{method}: done in {wall:.0f}s", file=sys.stderr, flush=True)
    done = [m for m in methods if "error" not in rows[m]]
    if done:  # the reference row: real target digits swapped in, on the same inputs and targets
        ref = reference_run(out / done[0], out / "real-nn", train_x, train_y)
        rows["real-nn"] = {**measure(ref, train_x, train_y, train_feats), "run": str(ref)}
    text = table(rows)
    chosen = "; ".join(f"{m}: {' '.join(v)}" for m, v in settings.items()) or "default presets"
    print(f"demo benchmark: split {args.split}, {len(files)} digits, target auto, seed 0, {chosen}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(text)
    report = {"split": args.split, "n": len(files), "seed": 0, "target": "auto", "threads": args.threads,
              "settings": settings,
              "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
              "torch": torch.__version__, "methods": rows}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'benchmark.json'}")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
