"""Helpers for the classifier-adapter tests: exports of demo:digits, a protocol program, a minimal
standard-library HTTP server (with seeded fault injection) and a throw-away black-box explainer plugin."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"


def unused_port() -> int:
    """A loopback port nobody listens on (bound, read and released)."""
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def demo_reference(paths: list[Path]) -> np.ndarray:
    """Probabilities of the in-process demo:digits model for image files, (N, 10)."""
    import torch

    from cfx_cli.demo.classifier import load_pretrained
    from cfx_cli.images import decode

    model = load_pretrained()
    x = torch.from_numpy(np.stack([decode(p) for p in paths])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).double().numpy()


def export_torchscript(path: Path, labels: list[str] | None = None) -> Path:
    import warnings

    import torch

    from cfx_cli.demo.classifier import load_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(load_pretrained(), torch.rand(1, 3, 16, 16))
        meta = {"input_size": [16, 16]}
        if labels:
            meta["labels"] = labels
        torch.jit.save(traced, str(path), _extra_files={"cfx.json": json.dumps(meta)})
    return path


def export_onnx(path: Path, softmax: bool, labels: list[str] | None = None) -> Path:
    """The demo network as ONNX (legacy TorchScript-based exporter: works offline with `onnx` only)."""
    import warnings

    import onnx
    import torch

    from cfx_cli.demo.classifier import load_pretrained

    model = load_pretrained()
    if softmax:
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["images"], output_names=["out"],
                          dynamic_axes={"images": {0: "n"}, "out": {0: "n"}})
    if labels:
        m = onnx.load(str(path))
        entry = m.metadata_props.add()
        entry.key, entry.value = "labels", json.dumps(labels)
        onnx.save(m, str(path))
    return path


DOCS = Path(__file__).resolve().parents[1] / "docs" / "classifiers"


def docs_example(page: str) -> str:
    """The first python block of a docs page: the copy-paste examples are tested as written."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def write_cmd_program(folder: Path) -> Path:
    path = folder / "digits_cmd.py"
    path.write_text(docs_example("cmd.md"))
    return path


class DemoServer(ThreadingHTTPServer):
    """A minimal stdlib server for demo:digits, written independently of cfx serve.

    ``fault_seed`` enables seeded faults per request: by default (``rates``) 10% HTTP 500 (its body echoes
    the request's Authorization header, as a careless server might), 5% answered only after ``delay``
    seconds, 2% malformed JSON. ``log`` records (pixel-hash tuple, outcome) per request, ``connections`` the
    client port of each request (one port per TCP connection).

    ``empty`` is what the server does with the empty start-up request: ``"labels"`` answers the labels (as
    documented); ``"stack"`` runs the model code without a special case, whose ``np.stack`` of no arrays
    raises, so the standard library's server closes the connection without an answer; a number answers
    that HTTP status. ``poison`` (an RGB triple) makes any request holding an image whose top-left pixel is
    that colour answer 500, as a server whose model fails on one input would. ``keep_alive`` speaks
    HTTP/1.1 with persistent connections (the standard library's default is HTTP/1.0, a connection each).
    """

    daemon_threads = True

    def __init__(self, token: str | None = None, fault_seed: int | None = None, delay: float = 1.0,
                 send_labels: bool = True, rates: tuple[float, float, float] = (0.10, 0.05, 0.02),
                 empty: str | int = "labels", poison: tuple[int, int, int] | None = None,
                 keep_alive: bool = False) -> None:
        handler = _KeepAliveHandler if keep_alive else _DemoHandler
        super().__init__((LOOPBACK, 0), handler)
        import torch

        from cfx_cli.demo.classifier import load_pretrained

        torch.set_num_threads(1)
        self.model = load_pretrained()
        self.token = token
        self.rng = random.Random(fault_seed) if fault_seed is not None else None
        self.delay = delay
        self.send_labels = send_labels
        self.rates = rates
        self.empty = empty
        self.poison = poison
        self.log: list[tuple[tuple[str, ...], str]] = []
        self.connections: list[int] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}/predict"

    def __enter__(self) -> DemoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        pass  # delayed answers hit closed sockets: expected

    def fault(self) -> str:
        with self.lock:
            if self.rng is None:
                return "ok"
            r = self.rng.random()
        p500, pdelay, pmalformed = self.rates
        return ("500" if r < p500 else "delay" if r < p500 + pdelay
                else "malformed" if r < p500 + pdelay + pmalformed else "ok")


def pixel_hash(arr_uint8: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr_uint8).tobytes()).hexdigest()[:16]


class _DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        import torch
        from PIL import Image

        srv = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        auth = self.headers.get("Authorization", "")
        if srv.token and auth != f"Bearer {srv.token}":
            return self._reply(401, json.dumps({"error": f"bad credentials {auth!r}"}).encode())
        images = json.loads(body)["images"]
        arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in images]
        key = tuple(pixel_hash(a) for a in arrays)
        outcome = srv.fault()
        if srv.poison is not None and any(tuple(a[0, 0]) == srv.poison for a in arrays):
            outcome = "poison"
        if not arrays and isinstance(srv.empty, int):
            outcome = str(srv.empty)
        with srv.lock:
            srv.log.append((key, outcome))
            srv.connections.append(self.client_address[1])
        if outcome == "poison":
            return self._reply(500, json.dumps({"error": "model failed on this input"}).encode())
        if not arrays and isinstance(srv.empty, int):
            return self._reply(srv.empty, json.dumps({"error": "expected at least one image"}).encode())
        if outcome == "500":
            return self._reply(500, json.dumps({"error": f"injected fault (request had {auth})"}).encode())
        if outcome == "delay":
            time.sleep(srv.delay)
        if outcome == "malformed":
            return self._reply(200, b'{"probabilities": [[0.1, 0.2,')
        if arrays or srv.empty == "stack":  # "stack": np.stack([]) raises; the server closes the connection
            x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
            with torch.no_grad():
                probs = torch.softmax(srv.model(x), dim=1).double().tolist()
        else:
            probs = []
        answer: dict = {"probabilities": probs}
        if srv.send_labels:
            answer["labels"] = [str(i) for i in range(10)]
        self._reply(200, json.dumps(answer).encode())


class _KeepAliveHandler(_DemoHandler):
    protocol_version = "HTTP/1.1"


BLACKBOX_PLUGIN = '''
"""A throw-away black-box explainer for tests: brightens the image by 1/255 and asks the classifier."""
from cfx_cli.explainers import Explainer, ExplainOutput
from cfx_cli.hookspecs import hookimpl


class Brighten(Explainer):
    name = "bbtest"
    summary = "test-only black-box explainer"
    requires = frozenset({"probabilities"})
    params = ()

    def explain(self, batch):
        cf = (batch.images + 1 / 255).clamp(0, 1)
        self.context.classifier.predict_proba(cf)  # a black-box method queries the classifier
        return [ExplainOutput(counterfactual=cf[i], params={}, nfe=1) for i in range(len(cf))]


@hookimpl
def register_explainers(register):
    register(Brighten)
'''


def blackbox_plugin_path(folder: Path) -> Path:
    """A folder to put on PYTHONPATH that installs the `bbtest` explainer through a dist-info entry point."""
    site = folder / "site"
    dist = site / "cfx_test_blackbox-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cfx-test-blackbox\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cfx]\nbbtest = cfx_test_blackbox\n")
    (site / "cfx_test_blackbox.py").write_text(BLACKBOX_PLUGIN)
    return site


def digit_pngs(folder: Path, n: int) -> list[Path]:
    """n held-out digits of the demo split as 16×16 PNGs."""
    from cfx_cli.demo.data import load_split
    from cfx_cli.images import save_png

    _, _, x_te, y_te = load_split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"d{i:03d}-label{int(y_te[i])}.png"
        save_png(x_te[i].transpose(1, 2, 0), p)
        paths.append(p)
    return paths


def wait_for_line(stream, timeout: float) -> str:
    """First line of a subprocess's stdout, or '' after ``timeout`` seconds."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def python() -> str:
    return sys.executable
