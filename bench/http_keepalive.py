"""Requests/s of the http:// classifier adapter: pooled keep-alive connections (httpx, cfx now) against a new
connection per request, side by side against loopback servers in another process.

    .venv/bin/python bench/http_keepalive.py [--seconds 1] [--rounds 3]

Servers (threaded, HTTP/1.1, keep-alive; a separate process, so that its threads do not compete with the
client's for one GIL): ``stdlib``, a minimal server written to the protocol that answers fixed probabilities
(the numbers are then the client's and the transport's cost, not a model's); ``serve``, ``cfx serve``'s own
server around a classifier that does no work; ``stdlib+TLS``, the first behind TLS with a throw-away
self-signed certificate (needs the ``openssl`` command; trusted through ``SSL_CERT_FILE``).

Clients, each doing the whole of cfx's work per request (JSON-encode the batch of base64 PNGs, POST it with
the bearer token, read and validate the answer into a probability tensor):
``pooled``: cfx's adapter as it is (``HttpClassifier._post_batch``: httpx, pooled keep-alive connections);
``close``: the same adapter sending ``Connection: close`` (a new connection per request, same library);
``old``: what cfx did before, a new ``http.client`` connection per request, closed after the answer.
Every round measures every case for ``--seconds`` (interleaved, so machine noise hits every case alike); the
table shows medians over rounds and the ratios of ``pooled`` to the others.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfx_cli.classifiers import Classifier, ClassifierOptions  # noqa: E402
from cfx_cli.protocol import encode_images, parse_answer  # noqa: E402

TOKEN = "bench-token"
LABELS = [str(i) for i in range(10)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # persistent connections
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["images"])
        body = json.dumps({"probabilities": [[0.1] * 10] * n, "labels": LABELS}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Uniform(Classifier):
    """A classifier that does no work, for cfx serve."""

    labels = LABELS
    spec = "bench:uniform"

    def predict_proba(self, images):
        import torch

        return torch.full((len(images), 10), 0.1)


def serve(kind: str, cert: str | None) -> None:
    """Run one server in this process; print its port."""
    if kind == "serve":
        from cfx_cli.serve import ClassifierServer

        server = ClassifierServer(("127.0.0.1", 0), _Uniform(), token=TOKEN)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        if cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, cert)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def self_signed(folder: str) -> str | None:
    if not shutil.which("openssl"):
        return None
    pem = os.path.join(folder, "loopback.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", pem,
                    "-out", pem, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return pem


def adapter_client(url: str, concurrency: int, keep_alive: bool = True):
    from cfx_plugins.classifiers.http import HttpClassifier

    clf = HttpClassifier(f"{url}#concurrency={concurrency}&retries=0", ClassifierOptions())
    if not keep_alive:
        clf._http().headers["Connection"] = "close"
    return clf._post_batch, clf.close


def old_client(url: str, concurrency: int):
    u = urlsplit(url)
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "cfx",
               "Authorization": f"Bearer {TOKEN}"}

    def post(images: list[str]):
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=30, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request("POST", u.path, body=json.dumps({"images": images}).encode(), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, resp.status
        return parse_answer(body, len(images), 10, url, False)[0]

    return post, lambda: None


CLIENTS = {
    "pooled": adapter_client,
    "close": lambda url, c: adapter_client(url, c, keep_alive=False),
    "old": old_client,
}


def measure(post, payload: list[str], concurrency: int, seconds: float) -> float:
    """Requests per second: ``concurrency`` threads sending ``payload`` back to back for ``seconds``."""
    stop = time.perf_counter() + seconds
    counts = [0] * concurrency

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            post(payload)
            counts[i] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "CERT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve[0], None if args.serve[1] == "-" else args.serve[1])

    import torch

    torch.set_num_threads(1)
    os.environ["CFX_HTTP_TOKEN"] = TOKEN
    gen = torch.Generator().manual_seed(0)
    payloads = {n: encode_images(torch.rand(n, 3, 16, 16, generator=gen)) for n in (1, 16)}
    tmp = tempfile.mkdtemp(prefix="cfx-bench-")
    cert = self_signed(tmp)
    servers = {"stdlib": ("stdlib", "-", "http"), "serve": ("serve", "-", "http")}
    if cert:
        servers["stdlib+TLS"] = ("stdlib", cert, "https")
        os.environ["SSL_CERT_FILE"] = cert  # the adapter trusts the system store, which honours this
    procs, urls = [], {}
    try:
        for name, (kind, pem, scheme) in servers.items():
            proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, pem], stdout=subprocess.PIPE,
                                    text=True, env=dict(os.environ, CFX_HTTP_TOKEN=TOKEN))
            procs.append(proc)
            urls[name] = f"{scheme}://127.0.0.1:{int(proc.stdout.readline())}/predict"
        cases = [(s, n, c) for s in servers for n in (1, 16) for c in (1, 4)]
        results = {case: {k: [] for k in CLIENTS} for case in cases}
        for _ in range(args.rounds):
            for case in cases:
                server, n, conc = case
                for name, make in CLIENTS.items():
                    post, close = make(urls[server], conc)
                    try:
                        post(payloads[n])  # warm up: the pooled client opens its connection here
                        results[case][name].append(measure(post, payloads[n], conc, args.seconds))
                    finally:
                        close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    import httpx

    print(f"median requests/s over {args.rounds} rounds of {args.seconds:g} s per case; 16x16 PNGs; "
          f"python {sys.version.split()[0]}, httpx {httpx.__version__}, {os.cpu_count()} CPUs")
    print("| server | images/request | threads | pooled (cfx now) | Connection: close | old http.client "
          "| pooled / close | pooled / old |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (server, n, conc), r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        print(f"| {server} | {n} | {conc} | {med['pooled']:.0f} | {med['close']:.0f} | {med['old']:.0f} "
              f"| {med['pooled'] / med['close']:.2f}x | {med['pooled'] / med['old']:.2f}x |")


if __name__ == "__main__":
    main()
