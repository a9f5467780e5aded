"""http:// adapter and `cfx serve`: real servers on 127.0.0.1, fault injection, resume, token hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from adapter_helpers import (
    DemoServer,
    blackbox_plugin_path,
    demo_reference,
    digit_pngs,
    pixel_hash,
    unused_port,
    wait_for_line,
)

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.classify import classify_inputs
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.images import discover

DIGITS = [str(i) for i in range(10)]
TOKEN = "tok-4f9a1c7e-never-logged"
FAST = "timeout=5&retries=2&backoff=0.01"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probs(results: list[dict]) -> np.ndarray:
    assert all(r.get("error") is None for r in results), results
    return np.array([[r["probabilities"][lab] for lab in DIGITS] for r in results])


@pytest.fixture(scope="module")
def reference():
    from cfx_cli.demo import IMAGES_DIR

    paths = [it.path for it in discover([str(IMAGES_DIR)])]
    return paths, demo_reference(paths)


def test_minimal_stdlib_server_agrees_with_demo(reference):
    paths, ref = reference
    with DemoServer() as srv:
        spec = f"{srv.url}#{FAST}&batch_size=3&concurrency=3"
        results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 16, False)
        assert not failed
        assert np.abs(_probs(results) - ref).max() < 1e-4
        # 16 images in requests of at most 3, plus the empty start-up request
        sizes = sorted(len(k) for k, _ in srv.log)
        assert sizes == [0] + [1] + [3] * 5


def test_labels_from_first_answer_when_server_sends_none(reference):
    paths, ref = reference
    with DemoServer(send_labels=False) as srv:
        clf = load_classifier(f"{srv.url}#{FAST}", ClassifierOptions())
        with pytest.raises(UsageError, match="--labels"):
            clf.label_index("3")
        results, failed = classify_inputs([str(paths[0])], f"{srv.url}#{FAST}", None, "cpu", 4, False)
        assert not failed and results[0]["label"] == str(int(ref[0].argmax()))


def test_options_from_environment_and_spec(monkeypatch):
    with DemoServer() as srv:
        monkeypatch.setenv("CFX_HTTP_TIMEOUT", "7.5")
        monkeypatch.setenv("CFX_HTTP_BATCH_SIZE", "5")
        clf = load_classifier(f"{srv.url}#batch_size=2", ClassifierOptions())
        assert clf.timeout == 7.5 and clf.batch_size == 2 and clf.retries == 3
        monkeypatch.setenv("CFX_HTTP_RETRIES", "many")
        with pytest.raises(UsageError, match="CFX_HTTP_RETRIES"):
            load_classifier(srv.url, ClassifierOptions())


def test_unreachable_server_and_bad_token_are_clear_errors(monkeypatch):
    port = unused_port()
    with pytest.raises(UsageError, match=r"connection failed .*after 2 attempts"):
        load_classifier(f"http://127.0.0.1:{port}/p#retries=1&backoff=0.01&timeout=2", ClassifierOptions())
    with DemoServer(token=TOKEN) as srv:
        with pytest.raises(UsageError, match="HTTP 401.*set CFX_HTTP_TOKEN"):
            load_classifier(f"{srv.url}#{FAST}", ClassifierOptions())
        monkeypatch.setenv("CFX_HTTP_TOKEN", TOKEN + "-wrong")
        with pytest.raises(UsageError) as err:
            load_classifier(f"{srv.url}#{FAST}", ClassifierOptions())
        assert "check CFX_HTTP_TOKEN" in str(err.value) and TOKEN not in str(err.value)
        monkeypatch.setenv("CFX_HTTP_TOKEN", TOKEN)
        assert load_classifier(f"{srv.url}#{FAST}", ClassifierOptions()).labels == DIGITS


def test_malformed_answers_quote_what_was_wrong():
    import torch

    with DemoServer(fault_seed=0) as srv:
        clf = load_classifier(f"{srv.url}#{FAST}", ClassifierOptions())
        srv.fault = lambda: "malformed"
        with pytest.raises(ClassifierError) as err:
            clf.predict_proba(torch.rand(2, 3, 16, 16))
        assert "malformed response (not JSON)" in str(err.value)
        assert '{"probabilities": [[0.1, 0.2,' in str(err.value)
        # not retried, but sent again by halves (one image may be the cause): 2 images, 3 requests
        assert [len(k) for k, o in srv.log if o == "malformed"] == [2, 1, 1]


def _serve(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cfx_cli", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = wait_for_line(proc.stdout, timeout=60)
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError(f"cfx serve did not start: {line!r} {proc.stderr.read()}")
    return proc, line.rsplit(" on ", 1)[1].strip()


@pytest.mark.slow
def test_cfx_serve_subprocess_classify_and_blackbox_guard(tmp_path, cfx, demo_images, reference, monkeypatch):
    monkeypatch.delenv("CFX_HTTP_TOKEN", raising=False)
    env = dict(os.environ, CFX_HTTP_TOKEN=TOKEN, PYTHONPATH=str(blackbox_plugin_path(tmp_path)))
    proc, url = _serve(["--classifier", "demo:digits"], env)
    try:
        assert url.startswith("http://127.0.0.1:")
        res = cfx("classify", str(demo_images), "-c", url + "predict", "-f", "json", env=env)
        assert res.returncode == 0, res.stderr
        assert np.abs(_probs(json.loads(res.stdout)) - reference[1]).max() < 1e-4
        # a gradient-based method with a black-box classifier: exit 2, naming the black-box methods
        res_pgd = cfx("explain", str(demo_images), "-m", "pgd", "-c", url, "-o", str(tmp_path / "pgd"),
                      env=env)
        assert res_pgd.returncode == 2
        assert "needs classifier gradients" in res_pgd.stderr and "bbtest" in res_pgd.stderr
        assert not (tmp_path / "pgd").exists()
        # the black-box method runs through the same server
        res_bb = cfx("explain", str(demo_images), "-m", "bbtest", "-c", url, "-o", str(tmp_path / "bb"),
                     env=env)
        assert res_bb.returncode == 0, res_bb.stderr
        recs = [json.loads(x) for x in (tmp_path / "bb" / "manifest.jsonl").read_text().splitlines()]
        assert len(recs) == 16 and all(r["status"] in ("flipped", "not_flipped") for r in recs)
        # without the token the server answers 401: a usage error before any work
        with pytest.raises(UsageError, match="HTTP 401"):
            load_classifier(url, ClassifierOptions())
    finally:
        proc.terminate()
        _, server_err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert '"POST /predict HTTP/1.1" 200' in server_err and "401" in server_err
    texts = [res.stdout, res.stderr, res_pgd.stderr, res_bb.stdout, res_bb.stderr, server_err]
    texts += [p.read_text() for p in (tmp_path / "bb").rglob("*.json*")]
    assert all(TOKEN not in t for t in texts)


# Refused batches are retried by halves, so a fault costs an input its record only when it hits a request for
# that image alone: twice the server's default fault rates, and a seed chosen so that each kind of fault
# (500, timeout, malformed) still ends some input in `error`.
FAULT_RATES = (0.20, 0.10, 0.05)
FAULT_SEED = 19


def _requests(log: list[tuple[tuple, str]], retries: int) -> list[tuple[tuple, list[str]]]:
    """The server's log → (key, outcomes of its attempts) per request. Requests go one at a time: attempts of
    one request are consecutive (an answer, a malformed body, or 1 + retries attempts end one)."""
    requests: list[tuple[tuple, list[str]]] = []
    for key, outcome in log:
        last = requests[-1] if requests else None
        if last and last[0] == key and last[1][-1] in ("500", "delay") and len(last[1]) < 1 + retries:
            last[1].append(outcome)
        else:
            requests.append((key, [outcome]))
    return requests


def _calls(requests: list[tuple[tuple, list[str]]]) -> list[tuple[set[str], list[str]]]:
    """Requests → one entry per ``predict_proba`` call: (the images that failed, its first request's key). A
    refused request (its last attempt a 500 or a malformed body) of more than one image is followed by its two
    halves, breadth-first, within the same call."""
    from collections import deque

    calls: list[tuple[set[str], list[str]]] = []
    halves: deque[tuple] = deque()
    for key, outcomes in requests:
        if not key:
            continue  # the start-up probe
        if halves and key == halves[0]:
            halves.popleft()
        else:
            assert not halves, (key, halves)
            calls.append((set(), list(key)))
        refused = outcomes[-1] in ("500", "malformed")
        if refused and len(key) > 1:
            halves.extend([key[: len(key) // 2], key[len(key) // 2 :]])
        elif outcomes[-1] != "ok":
            calls[-1][0].update(key)
    assert not halves
    return calls


@pytest.mark.slow
def test_fault_injection_run_finishes_then_resume_completes(tmp_path, cfx):
    from cfx_cli.images import decode, to_uint8

    inputs = tmp_path / "digits"
    paths = digit_pngs(inputs, 64)
    env = {"CFX_HTTP_TOKEN": TOKEN, "PYTHONPATH": str(blackbox_plugin_path(tmp_path))}
    out = tmp_path / "run"
    with DemoServer(token=TOKEN, fault_seed=FAULT_SEED, rates=FAULT_RATES, delay=1.2) as srv:
        # one request at a time (halves too), so that faults are drawn in a deterministic order
        spec = f"{srv.url}#timeout=0.5&retries=1&backoff=0.02&concurrency=1"
        res = cfx("explain", str(inputs), "-m", "bbtest", "-c", spec, "-b", "4", "-o", str(out), env=env,
                  timeout=240)
        log = list(srv.log)
        records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]

        # every input has exactly one record
        assert sorted(r["source"] for r in records) == sorted(str(p) for p in paths)
        kinds = {o for _, o in log}
        assert {"500", "delay", "malformed", "ok"} <= kinds, kinds
        # retried requests succeed
        requests = _requests(log, retries=1)
        assert any(o[0] in ("500", "delay") and o[-1] == "ok" for _, o in requests)
        # Each input is classified (its original), then the explainer queries its counterfactual (the image
        # brightened by 1/255) together with the rest of its batch, then the counterfactual is classified
        # again. An input fails when its original fails, when any image of its batch's query fails (the
        # explainer's query fails as a whole), or when its counterfactual fails; an image fails only when a
        # request for it alone (or a timeout, which is not halved) fails.
        calls = _calls(requests)
        hashes = {}
        for p in paths:
            u8 = to_uint8(decode(p))
            hashes[str(p)] = (pixel_hash(u8), pixel_hash(to_uint8(np.clip(u8.astype(np.float32) / 255 + 1 / 255,
                                                                          0, 1))))
        expect_error = set()
        for src, (h0, h1) in hashes.items():
            original = [c for c in calls if h0 in c[1]]
            queries = [c for c in calls if h1 in c[1]]
            assert len(original) == 1 and len(queries) <= 2
            if h0 in original[0][0] or (queries and queries[0][0]) or (len(queries) == 2 and h1 in queries[1][0]):
                expect_error.add(src)
        errors = {r["source"]: r["error"] for r in records if r["status"] == "error"}
        assert expect_error and set(errors) == expect_error
        # a refused batch of 4 whose halves were answered costs no input its record
        assert any(len(k) == 4 and o in ("500", "malformed") for k, o in log)
        assert len(errors) < 4 * sum(1 for c in calls if c[0])
        assert res.returncode == 1, res.stderr
        for msg in errors.values():
            assert srv.url in msg
            assert ("HTTP 500: injected fault" in msg or "malformed response (not JSON)" in msg
                    or "no answer within 0.5s" in msg), msg
        # with this seed all three faults exhaust a request at least once (the run is deterministic:
        # one request at a time, faults drawn in arrival order)
        for needle in ("HTTP 500: injected fault", "malformed response (not JSON)", "no answer within 0.5s"):
            assert any(needle in m for m in errors.values()), needle
        # the server echoed the Authorization header in its 500 message: cfx redacts it
        assert all("Bearer <redacted>" in m for m in errors.values() if "HTTP 500" in m)
        assert TOKEN not in res.stdout + res.stderr

        # the server is healthy again: --resume completes the failed inputs only
        srv.rng = None
        n_before = len(srv.log)
        res2 = cfx("explain", str(inputs), "-m", "bbtest", "-c", spec, "-b", "4", "-o", str(out), "--resume",
                   env=env, timeout=240)
        assert res2.returncode == 0, res2.stderr
        retried = sum(len(k) for k, _ in srv.log[n_before:])
        assert retried == 3 * len(expect_error)  # originals, the explainer's query, re-classification
    final = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(final) == 64 and len({r["id"] for r in final}) == 64
    assert all(r["status"] in ("flipped", "not_flipped") for r in final)
    for f in [out / "run.json", out / "manifest.jsonl"]:
        assert TOKEN not in f.read_text()
    assert TOKEN not in res2.stdout + res2.stderr


@pytest.mark.slow
def test_docs_stdlib_server_example_works_as_written(tmp_path, reference):
    import socket

    from adapter_helpers import docs_example

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = docs_example("http.md")
    assert '("127.0.0.1", 8000)' in code
    (tmp_path / "server.py").write_text(code.replace('("127.0.0.1", 8000)', f'("127.0.0.1", {port})'))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "server.py")], stderr=subprocess.PIPE)
    try:
        paths, ref = reference
        spec = f"http://127.0.0.1:{port}/predict#retries=20&backoff=0.25&timeout=10"  # waits for start-up
        results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 16, False)
        assert not failed and np.abs(_probs(results) - ref).max() < 1e-4
    finally:
        proc.kill()
        proc.communicate(timeout=10)
