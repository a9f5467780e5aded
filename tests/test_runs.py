"""Run directories: resume, overwrite, crash safety (SIGKILL mid-run), manifest contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_cfx
from PIL import Image

from cfx_cli.runs import RECORD_FIELDS, Record, RunDir, read_manifest


def _records(run):
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_a_record_is_written_as_the_manifest_line_it_always_was(tmp_path):
    """The manifest format (keys and their order) is what other tools read: Record must not change it."""
    assert RECORD_FIELDS == (
        "id", "source", "status", "error", "source_label", "source_prob", "target_label", "target_prob_before",
        "target_prob_after", "cf_label", "counterfactual", "original", "mask", "params", "seed", "seconds", "nfe",
    )
    run = RunDir(tmp_path)
    run.append(Record(id="a", source="in/a.png", status="error", error="in/a.png: broken", seed=7))
    assert (tmp_path / "manifest.jsonl").read_text() == (
        '{"id": "a", "source": "in/a.png", "status": "error", "error": "in/a.png: broken", "source_label": null, '
        '"source_prob": null, "target_label": null, "target_prob_before": null, "target_prob_after": null, '
        '"cf_label": null, "counterfactual": null, "original": null, "mask": null, "params": null, "seed": 7, '
        '"seconds": null, "nfe": null}\n')
    assert read_manifest(tmp_path / "manifest.jsonl") == [Record("a", "in/a.png", "error", "in/a.png: broken",
                                                                 seed=7).to_dict()]


def test_existing_run_needs_resume_or_overwrite(tmp_path, demo_images):
    out = tmp_path / "run"
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "2", "--out", str(out)).returncode == 0
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "2", "--out", str(out))
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "4", "--out", str(out), "--resume")
    assert proc.returncode == 0
    recs = _records(out)
    assert len(recs) == 4 and len({r["id"] for r in recs}) == 4
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "4", "--out", str(out), "--resume",
                   "--set", "iterations=3")
    assert proc.returncode == 2 and "different parameters" in proc.stderr
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--limit", "1", "--out", str(out), "--overwrite")
    assert proc.returncode == 0 and len(_records(out)) == 1
    assert len(list((out / "counterfactuals").iterdir())) == 1


def test_overwrite_refuses_a_foreign_directory(tmp_path, demo_images):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--out", str(tmp_path), "--overwrite")
    assert proc.returncode == 2 and "refusing to delete" in proc.stderr
    assert (tmp_path / "precious.txt").exists()


def test_manifest_records_follow_the_contract(tmp_path, demo_images):
    out = tmp_path / "run"
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--out", str(out)).returncode == 0
    info = json.loads((out / "run.json").read_text())
    for key in ("method", "parameters", "classifier", "versions", "device", "timings"):
        assert key in info
    assert info["classifier"]["spec"] == "demo:digits" and info["versions"]["torch"]
    fields = {"id", "source", "status", "error", "source_label", "source_prob", "target_label",
              "target_prob_before", "target_prob_after", "cf_label", "counterfactual", "original", "mask",
              "params", "seed", "seconds", "nfe"}
    for rec in _records(out):
        assert set(rec) == fields
        assert (out / rec["original"]).exists() and (out / rec["counterfactual"]).exists()
        assert rec["status"] == ("flipped" if rec["cf_label"] == rec["target_label"] else "not_flipped")
        assert rec["nfe"] > 0


def test_torn_manifest_line_is_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare(resume=False, overwrite=False)
    run.append({"id": "a", "status": "flipped"})
    run.append({"id": "b", "status": "error", "error": "x"})
    with open(run.manifest_path, "a") as f:
        f.write('{"id": "c", "sta')  # crash mid-write
    assert [r["id"] for r in read_manifest(run.manifest_path)] == ["a", "b"]
    done = run.prepare(resume=True, overwrite=False)
    assert list(done) == ["a"]  # errors are retried
    assert run.manifest_path.read_text() == '{"id": "a", "status": "flipped"}\n'


@pytest.mark.slow
def test_sigkill_then_resume_gives_one_record_per_input(tmp_path):
    from cfx_cli.demo.data import load_split

    _, _, x_te, _ = load_split()
    folder = tmp_path / "in"
    folder.mkdir()
    n = 40
    for i in range(n):
        Image.fromarray((x_te[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cfx_cli", "explain", str(folder), "--method", "pgd", "--out", str(out),
            "--batch-size", "2", "--set", "iterations=150"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_manifest(manifest))
    assert 0 < partial < n, "the kill should land mid-run"

    res = run_cfx("explain", str(folder), "--method", "pgd", "--out", str(out), "--batch-size", "8",
                  "--set", "iterations=150", "--resume")
    assert res.returncode == 0, res.stderr
    recs = _records(out)
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    for folder_name in ("originals", "counterfactuals"):
        files = sorted((out / folder_name).iterdir())
        assert len(files) == n and not any(f.name.startswith(".tmp-") for f in files)
        for f in files:
            with Image.open(f) as img:
                img.load()  # decodes fully: no half-written image


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    import os
    import stat

    from cfx_cli.atomic import atomic_write

    target = tmp_path / "sub" / "file.json"
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write("old")
    assert target.read_text() == "old" and stat.S_IMODE(os.stat(target).st_mode) == 0o644
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old"  # the failed write left the old file and no temporary file
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]
