"""`--executor ray`: a local 2-CPU Ray cluster, 2 workers; same results as a local run; a killed worker
loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cfx, write_digit_folder

pytestmark = pytest.mark.slow
# a throw-away cluster on loopback, for this test only: no token needed between its processes
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_address():
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'cfx[ray]')")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, **RAY_ENV)
    import socket

    with socket.socket() as sock:  # a free port: several suites may share the machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # loopback only: this test cluster must never listen on or reach another address
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", f"--port={port}", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


def _records(run):
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_ray_run_equals_local_run(tmp_path, demo_images, ray_address):
    common = ["--method", "pgd", "--set", "iterations=10", "--batch-size", "3"]
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert run_cfx("explain", str(demo_images), *common, "--out", str(local)).returncode == 0
    proc = run_cfx("explain", str(demo_images), *common, "--out", str(distributed), "--executor", "ray",
                   "--ray-address", ray_address, "--workers", "2", env=RAY_ENV)
    assert proc.returncode == 0, proc.stderr
    a = {r["id"]: r for r in _records(local)}
    recs = _records(distributed)
    b = {r["id"]: r for r in recs}
    assert len(recs) == len(b) == 16 and a.keys() == b.keys()
    for ident in a:
        assert a[ident]["cf_label"] == b[ident]["cf_label"]
        cf_local, cf_ray = local / a[ident]["counterfactual"], distributed / b[ident]["counterfactual"]
        assert cf_local.read_bytes() == cf_ray.read_bytes()


def _worker_pids() -> list[int]:
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                cmd = (proc_dir / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if "RayExplainWorker" in cmd:
                pids.append(int(proc_dir.name))
    return pids


def test_killed_worker_loses_and_duplicates_nothing(tmp_path, ray_address):
    n = 24
    folder = write_digit_folder(tmp_path / "in", n, "d")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cfx_cli", "explain", str(folder), "--method", "pgd", "--set", "iterations=300",
            "--batch-size", "2", "--out", str(out), "--executor", "ray", "--ray-address", ray_address,
            "--workers", "2"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **RAY_ENV))
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        manifest = out / "manifest.jsonl"
        pids = _worker_pids()
        if pids and manifest.exists() and len(manifest.read_text().splitlines()) >= 4:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    stdout, stderr = driver.communicate(timeout=300)
    assert killed is not None, "the worker should have been killed mid-run"
    assert driver.returncode == 0, stderr
    recs = _records(out)
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    assert all(r["status"] in ("flipped", "not_flipped") for r in recs)
    files = sorted((out / "counterfactuals").iterdir())
    assert len(files) == n and not any(f.name.startswith(".tmp-") for f in files)
    shutil.rmtree(folder)


def test_missing_ray_is_a_usage_error(tmp_path, demo_images):
    argv = ["cfx", "explain", str(demo_images), "--method", "pgd", "--executor", "ray", "--out", str(tmp_path / "r")]
    code = f"import sys; sys.modules['ray'] = None; sys.argv = {argv!r}\nfrom cfx_cli.cli import main\nmain()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install 'cfx[ray]'" in proc.stderr
