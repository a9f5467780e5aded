"""Check that a refactoring changed no behaviour: every built-in method on the demo digits, byte for byte.

    # at the old commit (its own checkout and venv), write the reference runs:
    python scripts/compare_demo_runs.py --python OLD/.venv/bin/python --out /tmp/runs-old
    # at the new commit, run again and compare with them:
    python scripts/compare_demo_runs.py --out /tmp/runs-new --compare /tmp/runs-old

Each method runs as ``cfx explain cfx_cli/demo/images --method M --target auto --seed 0`` (default presets, one
process per method, 1 thread) with the interpreter given by ``--python`` (default: this one), so the same script
drives an old and a new checkout. The comparison covers the bytes of every PNG under ``originals/``,
``counterfactuals/`` and ``masks/`` and every manifest field except wall-clock times (``seconds``,
``params.*seconds*``), with ``source`` compared by file name (``--allow-new-fields`` lets fields that a change
adds on purpose be absent from the old runs). It prints one line per method and exits 1 when
anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("pgd", "dime", "ace", "rcsb", "time", "eced", "fastdime")
VOLATILE = {"seconds"}


def run_method(python: str, method: str, out: Path, images: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CFX_DEBUG="1")
    cmd = [python, "-m", "cfx_cli", "explain", str(images), "--method", method, "--target", "auto",
           "--seed", "0", "--out", str(out), "--overwrite"]
    # cwd outside any checkout: `python -m cfx_cli` must import the interpreter's own cfx, not one in the cwd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode not in (0, 1):
        sys.exit(f"{method}: cfx explain failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def snapshot(run: Path) -> dict:
    files = {}
    for sub in ("originals", "counterfactuals", "masks"):
        for path in sorted((run / sub).rglob("*.png")) if (run / sub).exists() else []:
            files[str(path.relative_to(run))] = hashlib.sha256(path.read_bytes()).hexdigest()
    records = {}
    for line in (run / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        rec = {k: v for k, v in rec.items() if k not in VOLATILE}
        rec["source"] = Path(rec["source"]).name  # checkouts live in different folders
        if isinstance(rec.get("params"), dict):  # wall-clock times some methods report among their params
            rec["params"] = {k: v for k, v in rec["params"].items() if "seconds" not in k}
        records[rec["id"]] = rec
    return {"files": files, "records": records}


def compare(old: dict, new: dict, added: frozenset[str] = frozenset()) -> list[str]:
    """What differs; ``added``: manifest fields a change introduced on purpose (absent from the old records: not
    a difference; present in both: compared like any other)."""
    problems = []
    for name in sorted(set(old["files"]) | set(new["files"])):
        if old["files"].get(name) != new["files"].get(name):
            problems.append(f"{name}: " + ("missing" if name not in new["files"] else
                                           "new" if name not in old["files"] else "bytes differ"))
    for ident in sorted(set(old["records"]) | set(new["records"])):
        a, b = old["records"].get(ident), new["records"].get(ident)
        if a is None or b is None:
            problems.append(f"record {ident}: {'missing' if b is None else 'new'}")
            continue
        for key in sorted(set(a) | set(b)):
            if key in added and key not in a:
                continue
            if a.get(key) != b.get(key):
                problems.append(f"record {ident} field {key}: {a.get(key)!r} != {b.get(key)!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter whose cfx runs the methods")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs (one sub-folder per method)")
    parser.add_argument("--compare", type=Path, help="reference runs written earlier by this script")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--allow-new-fields", default="",
                        help="comma list of manifest fields the new checkout adds on purpose (e.g. "
                             "source_size,size,crop against a run from before they existed)")
    # the same images for both checkouts: this checkout's demo folder
    parser.add_argument("--images", type=Path, default=REPO / "cfx_cli" / "demo" / "images")
    args = parser.parse_args(argv)
    failed = False
    for method in args.methods.split(","):
        run = args.out.resolve() / method
        run_method(args.python, method, run, args.images.resolve())
        snap = snapshot(run)
        if args.compare is None:
            print(f"{method}: {len(snap['records'])} records, {len(snap['files'])} images written")
            continue
        added = frozenset(f for f in args.allow_new_fields.split(",") if f)
        problems = compare(snapshot(args.compare / method), snap, added)
        failed |= bool(problems)
        verdict = "identical" if not problems else f"{len(problems)} differences"
        print(f"{method}: {len(snap['records'])} records, {len(snap['files'])} images: {verdict}")
        for line in problems[:20]:
            print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
