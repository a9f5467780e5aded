"""Run directories: resume, overwrite, crash safety (SIGKILL mid-run), manifest contents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cfx, write_digit_folder
from PIL import Image

from cfx_cli.runs import RECORD_FIELDS, Record, RunDir, read_manifest


def _records(run):
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_a_record_is_written_as_the_manifest_line_it_always_was(tmp_path):
    """The manifest format (keys and their order) is what other tools read: Record must not change it."""
    assert RECORD_FIELDS == (
        "id", "source", "status", "error", "source_label", "source_prob", "target_label", "target_prob_before",
        "target_prob_after", "cf_label", "counterfactual", "original", "mask", "params", "seed", "seconds", "nfe",
        "source_size", "size", "crop",  # issue 18: appended, the earlier keys keep their order
    )
    run = RunDir(tmp_path)
    run.append(Record(id="a", source="in/a.png", status="error", error="in/a.png: broken", seed=7))
    assert (tmp_path / "manifest.jsonl").read_text() == (
        '{"id": "a", "source": "in/a.png", "status": "error", "error": "in/a.png: broken", "source_label": null, '
        '"source_prob": null, "target_label": null, "target_prob_before": null, "target_prob_after": null, '
        '"cf_label": null, "counterfactual": null, "original": null, "mask": null, "params": null, "seed": 7, '
        '"seconds": null, "nfe": null, "source_size": null, "size": null, "crop": null}\n')
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
              "params", "seed", "seconds", "nfe", "source_size", "size", "crop"}
    assert info["working_size"] == [16, 16]  # PGD: the demo classifier's declared size
    for rec in _records(out):
        assert set(rec) == fields
        assert rec["source_size"] == rec["size"] == [16, 16] and rec["crop"] is None
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
    n = 40
    folder = write_digit_folder(tmp_path / "in", n, "img")
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
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running" and info["process"]["pid"] == proc.pid and info["inputs_total"] == n

    # cfx eval says the run was interrupted, and how far it got
    ev = run_cfx("eval", str(out), "--format", "json")
    assert ev.returncode == 0, ev.stderr
    assert (f"warning: {out}: interrupted (run.json says running, but process {proc.pid} on "
            f"{info['process']['host']} is gone); {partial} of {n} inputs have records") in ev.stderr

    res = run_cfx("explain", str(folder), "--method", "pgd", "--out", str(out), "--batch-size", "8",
                  "--set", "iterations=150", "--resume")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert f"resuming: {partial} of {n} inputs done, {n - partial} to go (the run was interrupted: process " \
           f"{proc.pid} on {info['process']['host']} is gone)" in lines
    bar = [x for x in lines if x.startswith("explain (pgd): ")]
    assert bar and all(int(x.split()[2].split("/")[0]) > partial for x in bar)  # counts on from the done ones
    assert bar[-1].startswith(f"explain (pgd): {n}/{n} (100%)")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "interrupted" not in run_cfx("eval", str(out)).stderr
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
    assert target.read_text() == "old" and stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~_umask()
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old"  # the failed write left the old file and no temporary file
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_run_files_follow_the_umask(tmp_path, demo_images, mask):
    """Images, masks, run.json, the manifest, eval.json and report.html get the permissions any file the user
    creates gets: 0644 under umask 022 (a run directory can be shared or served), 0600 under 077."""
    out = tmp_path / "run"
    old = os.umask(mask)  # inherited by the cfx subprocesses
    try:
        proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "iterations=2", "--limit", "2",
                       "--region", "auto", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert run_cfx("eval", str(out)).returncode == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"run.json", "manifest.jsonl", "eval.json", "report.html"} <= names
    assert {p.parent.name for p in files} >= {"originals", "counterfactuals", "masks"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}


def test_eta_leaves_out_the_start_up_and_follows_recent_batches():
    """`8/16 … eta 1s` and done at 7 s: the first batch's time held the model loading; the pace comes from the
    batches after it, and from the recent ones when the pace changes."""
    from cfx_cli.progress import EtaEstimator

    now = [0.0]
    eta = EtaEstimator(total=40, initial=8, clock=lambda: now[0])  # 8 done before (a resumed run)
    assert eta.seconds_left() is None and eta.text() == "?"
    now[0] = 6.0  # first batch: 6 s, of which 5 s were loading
    eta.update(12)
    assert eta.seconds_left() == pytest.approx(28 * 6.0 / 4)  # nothing better yet: the rough rate from the start
    for k in range(1, 4):  # then one batch of 4 per second
        now[0] = 6.0 + k
        eta.update(12 + 4 * k)
    assert eta.seconds_left() == pytest.approx((40 - 24) / 4)  # 4 s left, not the 8+ s the mean rate says
    assert eta.text() == "4s"
    for k in range(1, 13):  # the pace drops to one input per 2 s: after a window of batches the estimate follows
        now[0] = 9.0 + 2 * k
        eta.update(24 + k)
    assert eta.seconds_left() == pytest.approx((40 - 36) * 2.0)
    eta2 = EtaEstimator(total=100, clock=lambda: now[0])
    eta2.update(10)
    now[0] += 2
    eta2.update(20)
    assert eta2.seconds_left() == pytest.approx(80 * 2 / 10)
    assert EtaEstimator(10).text() == "?"


def test_a_live_run_is_not_resumed_twice_and_eval_says_it_is_running(tmp_path, demo_images):
    """run.json names a live process on this host (here: the test itself): a second writer is refused."""
    out = tmp_path / "run"
    assert run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "iterations=2", "--limit", "2",
                   "--out", str(out)).returncode == 0
    info = json.loads((out / "run.json").read_text())
    info.update(status="running", process={"pid": os.getpid(), "host": info["process"]["host"],
                                           "pid_started": None})
    (out / "run.json").write_text(json.dumps(info))
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "iterations=2", "--limit", "4",
                   "--out", str(out), "--resume")
    assert proc.returncode == 2 and f"still being written by process {os.getpid()} on this host" in proc.stderr
    assert len(read_manifest(out / "manifest.jsonl")) == 2
    ev = run_cfx("eval", str(out))
    assert f"still running (process {os.getpid()} on {info['process']['host']}); 2 of 2 inputs" in ev.stderr


def test_strongly_resized_inputs_are_warned_and_counted(tmp_path):
    """A 1×1 picture explained as a 16×16 digit says so (issue 18's warning), and the summary counts it."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 200, 200)).save(folder / "dot.png")
    Image.new("RGB", (40, 16)).save(folder / "wide.png")
    Image.new("RGB", (17, 16)).save(folder / "fine.png")  # 6 % wider, 1.06×: no warning
    out = tmp_path / "run"
    proc = run_cfx("explain", str(folder), "--method", "pgd", "--set", "iterations=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    warned = [x for x in proc.stderr.splitlines() if x.startswith("warning: ")]
    assert warned == [
        f"warning: {folder / 'dot.png'}: resized from 1×1 to pgd's working size 16×16 (16× larger); the "
        "explanation is of the resized image",
        f"warning: {folder / 'wide.png'}: resized from 40×16 to pgd's working size 16×16 (aspect ratio 2.50 → "
        "1.00: centre-cropped); the explanation is of the resized image"]
    assert ", 2 resized >4× or cropped (" in proc.stdout
    assert json.loads((out / "run.json").read_text())["resized_inputs"] == 2
