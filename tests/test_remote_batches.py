"""Black-box classifiers written by others: servers and programs that do not answer the empty start-up request,
a poison input that the server refuses (only it fails: the batch is retried by halves), pooled connections."""

from __future__ import annotations

import http.client
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from adapter_helpers import DemoServer, blackbox_plugin_path, demo_reference, digit_pngs, unused_port

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.classify import classify_inputs
from cfx_cli.errors import UsageError
from cfx_cli.images import discover

DIGITS = [str(i) for i in range(10)]
FAST = "timeout=5&retries=2&backoff=0.01"
POISON = (255, 0, 255)  # a magenta top-left pixel: no demo digit has one
EMPTY_MODES = ["stack", 500, 422]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference():
    from cfx_cli.demo import IMAGES_DIR

    paths = [it.path for it in discover([str(IMAGES_DIR)])]
    return paths, demo_reference(paths)


def _agrees(results: list[dict], ref: np.ndarray) -> None:
    assert all(r.get("error") is None for r in results), results
    got = np.array([[r["probabilities"][lab] for lab in DIGITS] for r in results])
    assert np.abs(got - ref).max() < 1e-4


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- http: servers that do not answer empty batches
def test_the_stack_server_really_closes_the_connection_on_an_empty_batch():
    with DemoServer(empty="stack") as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
        conn.request("POST", "/predict", body=b'{"images": []}', headers={"Content-Type": "application/json"})
        with pytest.raises(http.client.RemoteDisconnected):
            conn.getresponse()
        conn.close()


@pytest.mark.parametrize("empty", EMPTY_MODES)
def test_server_without_an_empty_batch_case_classifies(empty, reference):
    paths, ref = reference
    with DemoServer(empty=empty) as srv:
        spec = f"{srv.url}#{FAST}"
        clf = load_classifier(spec, ClassifierOptions())
        assert not clf.labels_known  # labels come with the first answer
        assert [(len(k), o) for k, o in srv.log][:1] == [(0, "ok" if empty == "stack" else str(empty))]
        assert len(srv.log) == 1  # the probe is not retried: the answer (or its absence) would be the same
        with pytest.raises(UsageError, match="--labels"):
            clf.label_index("3")
        assert clf.predict_proba(__import__("torch").rand(2, 3, 16, 16)).shape == (2, 10)
        assert clf.labels == DIGITS and clf.label_index("3") == 3
        clf.close()
        results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 16, False)
        assert not failed
        _agrees(results, ref)


def test_only_nobody_listening_tls_and_authorization_stop_at_the_probe(monkeypatch):
    port = unused_port()
    with pytest.raises(UsageError, match=r"connection failed \(Connection refused\)"):
        load_classifier(f"http://127.0.0.1:{port}/p#retries=0&timeout=2", ClassifierOptions())
    with DemoServer(token="t0k") as srv:  # 401 to the probe
        with pytest.raises(UsageError, match="HTTP 401"):
            load_classifier(f"{srv.url}#{FAST}", ClassifierOptions())
    with DemoServer() as srv:  # TLS to a plain-HTTP server: the handshake fails
        with pytest.raises(UsageError, match="TLS|SSL"):
            load_classifier(srv.url.replace("http://", "https://") + "#retries=0&timeout=5", ClassifierOptions())


@pytest.mark.slow
def test_cli_classify_and_explain_through_servers_without_an_empty_batch_case(tmp_path, cfx, demo_images,
                                                                               reference):
    env = {"PYTHONPATH": str(blackbox_plugin_path(tmp_path)), "OMP_NUM_THREADS": "1"}
    for empty in EMPTY_MODES:
        with DemoServer(empty=empty) as srv:
            spec = f"{srv.url}#{FAST}"
            res = cfx("classify", str(demo_images), "-c", spec, "-f", "json", env=env)
            assert res.returncode == 0, (empty, res.stderr)
            _agrees(json.loads(res.stdout), reference[1])
            out = tmp_path / f"run-{empty}"
            res = cfx("explain", str(demo_images), "-m", "bbtest", "-c", spec, "-o", str(out), env=env)
            assert res.returncode == 0, (empty, res.stderr)
            recs = _records(out)
            assert len(recs) == 16 and all(r["status"] in ("flipped", "not_flipped") for r in recs), empty


# ---------------------------------------------------------------- http: one poison image among 64
def _poisoned_digits(folder: Path, n: int = 64, which: int = 37) -> tuple[list[Path], Path]:
    from PIL import Image

    paths = digit_pngs(folder, n)
    img = np.asarray(Image.open(paths[which]).convert("RGB")).copy()
    img[0, 0] = POISON
    Image.fromarray(img).save(paths[which])
    return paths, paths[which]


def test_a_poison_image_fails_alone_and_requests_stay_bounded(tmp_path):
    paths, poison = _poisoned_digits(tmp_path / "digits")
    ref = demo_reference(paths)
    with DemoServer(poison=POISON) as srv:
        # no retries: every request in the log is one attempt; 64 images in chunks of 16
        spec = f"{srv.url}#retries=0&timeout=10&batch_size=16"
        results, failed = classify_inputs([str(tmp_path / "digits")], spec, None, "cpu", 64, False)
        sizes = [len(k) for k, _ in srv.log[1:]]
        refused = [len(k) for k, o in srv.log if o == "poison"]
    assert failed
    errors = [r for r in results if r.get("error")]
    assert [r["source"] for r in errors] == [str(poison)]
    assert "HTTP 500: model failed on this input" in errors[0]["error"] and srv.url in errors[0]["error"]
    good = [i for i, p in enumerate(paths) if p != poison]
    _agrees([r for r in results if not r.get("error")], ref[good])
    # the refused chunk of 16 is halved down to the poison alone: 16, 8, 4, 2, 1 refused; 8, 4, 2, 1 answered
    assert refused == [16, 8, 4, 2, 1]
    assert sorted(sizes) == sorted([16] * 4 + [8, 8, 4, 4, 2, 2, 1, 1])
    assert len(sizes) <= 2 * len(paths) - 1


@pytest.mark.slow
def test_explain_with_a_poison_image_among_64_fails_only_it(tmp_path, cfx):
    paths, poison = _poisoned_digits(tmp_path / "digits")
    env = {"PYTHONPATH": str(blackbox_plugin_path(tmp_path)), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    with DemoServer(poison=POISON) as srv:
        res = cfx("explain", str(tmp_path / "digits"), "-m", "bbtest", "-c", f"{srv.url}#{FAST}", "-b", "64",
                  "-o", str(out), env=env)
    assert res.returncode == 1, res.stderr  # finished, one input in error
    recs = _records(out)
    assert len(recs) == 64
    errors = [r for r in recs if r["status"] == "error"]
    assert [r["source"] for r in errors] == [str(poison)]
    assert str(poison) in errors[0]["error"] and "HTTP 500: model failed on this input" in errors[0]["error"]
    assert sum(r["status"] in ("flipped", "not_flipped") for r in recs) == 63


# ---------------------------------------------------------------- http: pooled keep-alive connections
def test_requests_share_keep_alive_connections(reference, monkeypatch, caplog):
    paths, ref = reference
    monkeypatch.setenv("CFX_HTTP_TOKEN", "tok-kept-alive")
    caplog.set_level(logging.INFO)  # an application that logs at INFO: httpx's request lines stay out
    with DemoServer(keep_alive=True, token="tok-kept-alive") as srv:
        spec = f"{srv.url}#{FAST}&batch_size=3&concurrency=1"
        results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 16, False)
        assert not failed
        _agrees(results, ref)
        assert len(srv.log) == 7  # the probe and 6 requests, every one authorized ...
        assert len(set(srv.connections)) == 1  # ... over one TCP connection
        results, failed = classify_inputs([str(paths[0].parent)], f"{srv.url}#{FAST}&batch_size=2&concurrency=3",
                                          None, "cpu", 16, False)
        assert not failed and len(set(srv.connections[7:])) <= 3
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]


# ---------------------------------------------------------------- cmd: programs that do not answer empty batches
DIGITS_PROGRAM = '''
"""demo:digits over the subprocess protocol, written without a case for empty batches."""
import base64, io, json, sys
import numpy as np, torch
from PIL import Image
from cfx_cli.demo.classifier import load_pretrained

torch.set_num_threads(1)
mode = sys.argv[1]
model = load_pretrained()
for line in sys.stdin:
    images = json.loads(line)["images"]
    if not images and mode == "garbage":
        print("no images, nothing to do", flush=True)
        continue
    if not images and mode == "malformed":
        print(json.dumps({"probabilities": None}), flush=True)
        continue
    x = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), np.float32) / 255
                  for b in images])  # mode "exit": np.stack of nothing raises, the program exits with code 1
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x).permute(0, 3, 1, 2)), dim=1).double()
    print(json.dumps({"probabilities": probs.tolist(), "labels": [str(i) for i in range(10)]}), flush=True)
'''


@pytest.mark.parametrize("mode", ["exit", "garbage", "malformed"])
def test_cmd_program_without_an_empty_batch_case_classifies(mode, tmp_path, reference):
    paths, ref = reference
    prog = tmp_path / "digits_prog.py"
    prog.write_text(DIGITS_PROGRAM)
    spec = f"cmd:{sys.executable} {prog} {mode}#batch_size=5"
    clf = load_classifier(spec, ClassifierOptions())
    try:
        assert not clf.labels_known and clf.restarts == 0  # a restart after the probe is not counted
        assert clf._proc.popen.poll() is None
    finally:
        clf.close()
    results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 16, False)
    assert not failed
    _agrees(results, ref)


@pytest.mark.slow
def test_cli_explain_through_a_cmd_program_that_exits_on_the_empty_batch(tmp_path, cfx, demo_images):
    prog = tmp_path / "digits_prog.py"
    prog.write_text(DIGITS_PROGRAM)
    env = {"PYTHONPATH": str(blackbox_plugin_path(tmp_path)), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    res = cfx("explain", str(demo_images), "-m", "bbtest", "-c", f"cmd:{sys.executable} {prog} exit", "-o",
              str(out), env=env)
    assert res.returncode == 0, res.stderr
    recs = _records(out)
    assert len(recs) == 16 and all(r["status"] in ("flipped", "not_flipped") for r in recs)


BROKEN = "import sys\nprint('ImportError: no module named mymodel', file=sys.stderr)\nsys.exit(1)\n"
EXITS_ON_EMPTY = ("import json, sys\nfor line in sys.stdin:\n    if not json.loads(line)['images']:\n"
                  "        sys.exit(5)\n    print(json.dumps({'probabilities': [[1.0]] * len(json.loads(line)"
                  "['images'])}), flush=True)\n")


@pytest.mark.parametrize("can_tell", [True, False])
def test_cmd_program_that_cannot_start_still_stops_at_once(can_tell, tmp_path, monkeypatch):
    from cfx_plugins.classifiers import cmd

    if not can_tell:  # where the pipe cannot say whether the request was read: the restarted program decides
        monkeypatch.setattr(cmd._Process, "read_request", lambda self: None)
    (tmp_path / "broken.py").write_text(BROKEN)
    with pytest.raises(UsageError) as err:
        load_classifier(f"cmd:{sys.executable} {tmp_path / 'broken.py'}", ClassifierOptions())
    msg = str(err.value)
    assert "exited with code 1" in msg and "no module named mymodel" in msg and "\n" not in msg
    (tmp_path / "exits.py").write_text(EXITS_ON_EMPTY)
    clf = load_classifier(f"cmd:{sys.executable} {tmp_path / 'exits.py'}", ClassifierOptions())
    try:
        assert clf.predict_proba(__import__("torch").rand(3, 3, 4, 4)).tolist() == [[1.0]] * 3
        assert clf.labels == ["0"] and clf.restarts == 0
    finally:
        clf.close()


POISON_STUB = '''
import base64, io, json, sys
import numpy as np
from PIL import Image
for line in sys.stdin:
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
              for b in json.loads(line)["images"]]
    if any(tuple(int(v) for v in a[0, 0]) == (255, 0, 255) for a in images):
        print(json.dumps({"error": "cannot classify this one"}), flush=True)
        continue
    print(json.dumps({"probabilities": [[0.25, 0.75]] * len(images), "labels": ["cat", "dog"]}), flush=True)
'''


def test_cmd_poison_image_fails_alone(tmp_path):
    import torch

    from cfx_cli.classifiers import PartialClassifierError

    (tmp_path / "stub.py").write_text(POISON_STUB)
    clf = load_classifier(f"cmd:{sys.executable} {tmp_path / 'stub.py'}#batch_size=8", ClassifierOptions())
    try:
        x = torch.rand(20, 3, 4, 4) * 0.5
        x[13, :, 0, 0] = torch.tensor([1.0, 0.0, 1.0])
        with pytest.raises(PartialClassifierError) as err:
            clf.predict_proba(x)
        assert err.value.errors.keys() == {13} and "cannot classify this one" in err.value.errors[13]
        probs = err.value.probabilities
        assert torch.isnan(probs[13]).all()
        assert probs[[i for i in range(20) if i != 13]].tolist() == [[0.25, 0.75]] * 19
        assert clf.restarts == 0 and clf.calls == 19
    finally:
        clf.close()
