"""Startup time of `cfx --help` (must not import torch) next to `python -c pass` and `import torch`.

    .venv/bin/python bench/cli_startup.py [--runs 15]

Prints a table of min / median / max wall seconds over the runs, measured interleaved in one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "cfx --help": [sys.executable, "-m", "cfx_cli", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.runs):
        for name, cmd in CASES.items():  # interleaved, so machine noise hits every case alike
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':28s} {'min':>7s} {'median':>7s} {'max':>7s} {'median − python':>16s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} {min(ts):7.3f} {med:7.3f} {max(ts):7.3f} {med - base:16.3f}")


if __name__ == "__main__":
    main()
