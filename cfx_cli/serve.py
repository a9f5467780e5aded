"""``cfx serve``: any classifier spec behind the HTTP protocol, on the standard library's HTTP server.

``POST /`` (any path) with ``{"images": [<base64 PNG>, ...]}`` answers
``{"probabilities": [[...]], "labels": [...], "input_size": [H, W] | null}``; an empty list answers
the labels only (the probe ``cfx`` clients send at start). ``GET /`` describes the classifier. When
``CFX_HTTP_TOKEN`` is set in the server's environment, requests must carry it as a bearer token.
Requests are handled in threads; the model itself runs one batch at a time (a lock), which keeps
PyTorch and GPU memory use predictable.
"""

from __future__ import annotations

import hmac
import json
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cfx_cli.classifiers import Classifier, ClassifierOptions, load_classifier, read_labels_file
from cfx_cli.devices import resolve_device
from cfx_cli.errors import CfxError, UsageError
from cfx_cli.protocol import TOKEN_ENV, decode_image

MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_IMAGES = 4096


class ClassifierServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], classifier: Classifier, token: str | None = None,
                 log=None) -> None:
        super().__init__(address, _Handler)
        self.classifier = classifier
        self.token = token
        self.log = log  # a stream for one line per request, or None
        self.model_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def classify(self, images_b64: list) -> dict:
        """Decode, group by size and classify; raises ValueError for bad requests."""
        import numpy as np
        import torch

        from cfx_cli.images import resize

        clf = self.classifier
        arrays = []
        for i, data in enumerate(images_b64):
            try:
                arrays.append(resize(decode_image(data), clf.input_size))
            except ValueError as exc:
                raise ValueError(f"images[{i}]: {exc}") from None
        rows: list = [None] * len(arrays)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        for idx in groups.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
            with self.model_lock:
                probs = clf.predict_proba(x).cpu().double()
            for i, row in zip(idx, probs.tolist(), strict=True):
                rows[i] = row
        return {"probabilities": rows, "labels": list(clf.labels),
                "input_size": list(clf.input_size) if clf.input_size else None}


class _Handler(BaseHTTPRequestHandler):
    server: ClassifierServer
    protocol_version = "HTTP/1.1"
    server_version = "cfx-serve"
    # Headers and body leave in two writes: with Nagle's algorithm the body would wait for the client's
    # (delayed, up to 40 ms) ACK of the headers on every request of a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        # One line per request, never headers (they carry the bearer token).
        if self.server.log is not None:
            print(f"{self.address_string()} {format % args}", file=self.server.log, flush=True)

    def _send(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return True
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if not self._authorized():
            return
        self._send(HTTPStatus.OK, {"protocol": "cfx-classifier/1", **self.server.classifier.describe()})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            self._discard_body()
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"request larger than {MAX_REQUEST_BYTES >> 20} MiB; send smaller batches"})
            return
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self._send(HTTPStatus.BAD_REQUEST, {"error": "request body is not JSON"})
            return
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list):
            self._send(HTTPStatus.BAD_REQUEST, {"error": 'expected {"images": [<base64 PNG>, ...]}'})
            return
        if len(images) > MAX_IMAGES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"{len(images)} images in one request; at most {MAX_IMAGES}"})
            return
        try:
            answer = self.server.classify(images)
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except CfxError as exc:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
            return
        except Exception as exc:  # the model failed: tell the client why, keep serving
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._send(HTTPStatus.OK, answer)

    def _discard_body(self) -> None:
        try:
            length = min(int(self.headers.get("Content-Length", "0")), MAX_REQUEST_BYTES)
            self.rfile.read(length)
        except (ValueError, OSError):
            self.close_connection = True


def serve(spec: str, host: str, port: int, labels_file: str | None, device: str, trust_pickle: bool,
          quiet: bool = False) -> None:
    """Load the classifier, print where it is served, and serve until interrupted."""
    import os

    labels = read_labels_file(labels_file) if labels_file else None
    classifier = load_classifier(spec, ClassifierOptions(device=resolve_device(device), labels=labels,
                                                         trust_pickle=trust_pickle))
    token = os.environ.get(TOKEN_ENV) or None
    try:
        server = ClassifierServer((host, port), classifier, token=token, log=None if quiet else sys.stderr)
    except OSError as exc:
        classifier.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving on {host} without CFX_HTTP_TOKEN: anyone who can reach this port can "
              "query the classifier", file=sys.stderr)
    auth = "bearer token required" if token else "no authentication"
    print(f"serving {classifier.spec} ({len(classifier.labels)} classes, {auth}) on {server.url}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # close the classifier (a cmd: program) on kill too
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        classifier.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
