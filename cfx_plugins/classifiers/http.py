"""``http://…`` / ``https://…``: a classifier behind the HTTP protocol of DESIGN.md (black-box).

Each request is ``POST URL`` with ``{"images": [<base64 PNG>, ...]}``; the answer is
``{"probabilities": [[...], ...], "labels": [...]?}``. ``CFX_HTTP_TOKEN`` (environment only) is sent as
``Authorization: Bearer``; it never appears in messages, logs or run files. Redirects are not followed
(they could carry the token elsewhere).

Options go after ``#`` (a URL fragment is never sent to the server) or in environment variables:
``#timeout=30&retries=3&backoff=0.5&batch_size=16&concurrency=4&logits=0&size=HxW``. 5xx and 429
answers, timeouts and connection errors are retried with exponential backoff and jitter; a malformed
answer or another 4xx fails the batch at once with a message quoting what was wrong (and the batch is then
retried by halves, see :class:`~cfx_cli.protocol.RemoteClassifier`).

Requests travel over one pooled httpx client: keep-alive connections (at most ``concurrency``), HTTP/2 on
``https://`` when the ``h2`` package is installed. httpx is imported on first use, never by ``cfx --help``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import (
    TOKEN_ENV,
    Option,
    RefusedBatch,
    RemoteClassifier,
    answer_options,
    error_text,
    outcome,
    parse_answer,
    redact_url,
    redactor,
    resolve_options,
    split_options,
)

MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_BACKOFF_SECONDS = 60.0


def http_options():
    return (
        Option("timeout", "float", 30.0, "seconds to wait for connecting and for each answer",
               env="CFX_HTTP_TIMEOUT"),
        Option("retries", "int", 3, "retries of a request after a 5xx/429 answer, a timeout or a "
                                    "connection error", env="CFX_HTTP_RETRIES"),
        Option("backoff", "float", 0.5, "delay before the first retry in seconds; doubles each retry, "
                                        "times a random factor in [0.5, 1.5)", env="CFX_HTTP_BACKOFF"),
        Option("batch_size", "int", 16, "most images in one request", env="CFX_HTTP_BATCH_SIZE"),
        Option("concurrency", "int", 4, "most requests in flight at once", env="CFX_HTTP_CONCURRENCY"),
        *answer_options("server"),
    )


class HttpAdapter(ClassifierAdapter):
    name = "http"
    schemes = ("http", "https")
    summary = "remote classifier over HTTP (black-box): http://HOST:PORT/PATH[#timeout=30&retries=3]"

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        return HttpClassifier(spec, options)


# How an attempt failed decides what is retried, what stops cfx at start, and what is retried by halves.
FATAL = "fatal"  # a configuration problem (authorization, redirect, TLS): no use going on
UNREACHABLE = "unreachable"  # nobody listens (connection refused, unknown host, connect timeout)
SILENT = "silent"  # connected, but no answer (read timeout, connection closed or reset)
ANSWERED = "answered"  # the server answered with an error status or a body that is not an answer
THROTTLED = "throttled"  # 429: retried, but never by halves (more requests would not help)


class _Failure(Exception):
    """One attempt failed; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, kind: str, retry: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry = retry
        self.retry_after = retry_after


class HttpClassifier(RemoteClassifier):
    def __init__(self, spec: str, options: ClassifierOptions) -> None:
        base, raw = split_options(spec)
        self.spec = redact_url(spec)
        opts = resolve_options(self.spec, raw, http_options())
        url = urlsplit(base)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UsageError(f"classifier {self.spec}: expected http://HOST[:PORT]/PATH")
        if opts["batch_size"] < 1 or opts["concurrency"] < 1:
            raise UsageError(f"classifier {self.spec}: batch_size and concurrency must be at least 1")
        try:
            port = url.port
        except ValueError:
            raise UsageError(f"classifier {self.spec}: invalid port") from None
        self.scheme = url.scheme
        # user:password@ is dropped (httpx would send it as Basic auth): credentials go in CFX_HTTP_TOKEN
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        netloc = host + (f":{port}" if port is not None else "")
        self._url = urlunsplit((url.scheme, netloc, url.path or "/", url.query, ""))
        self.timeout = opts["timeout"] or None
        self.retries = opts["retries"]
        self.backoff = opts["backoff"]
        self.batch_size = opts["batch_size"]
        self.concurrency = opts["concurrency"]
        self.returns_logits = bool(opts["logits"] if opts["logits"] is not None else options.logits)
        self.raw_answers = options.raw_outputs
        self._token = os.environ.get(TOKEN_ENV) or None
        self._redact = redactor(self._token, url.password)
        self._pool = None
        self._client = None
        self._lock = threading.Lock()
        self.calls = 0
        self.labels = list(options.labels or [])
        self.labels_known = bool(self.labels)
        self.input_size = opts["size"]
        self._probe()

    # ----------------------------------------------------------------------- Classifier API
    def _send_chunks(self, chunks):
        if len(chunks) == 1:
            return [outcome(self._post_batch, chunks[0])]
        return list(self._executor().map(lambda chunk: outcome(self._post_batch, chunk), chunks))

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            if self._client is not None:
                self._client.close()
                self._client = None

    # ----------------------------------------------------------------------- transport
    def _executor(self):
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="cfx-http")
            return self._pool

    def _http(self):
        """The pooled client, made on first use: keep-alive connections shared by the request threads."""
        with self._lock:
            if self._client is None:
                import httpx  # not at module level: plugins are imported by `cfx --help`

                # httpx logs every request at INFO; cfx's output stays its own (CFX_DEBUG=1 shows it)
                level = logging.DEBUG if os.environ.get("CFX_DEBUG") else logging.WARNING
                for name in ("httpx", "httpcore", "hpack", "h2"):
                    logging.getLogger(name).setLevel(level)
                http2 = self.scheme == "https" and importlib.util.find_spec("h2") is not None
                transport = httpx.HTTPTransport(
                    # the system's certificate store as before (SSL_CERT_FILE selects another bundle);
                    # no proxies or .netrc from the environment: the token goes to this URL only
                    verify=ssl.create_default_context(), trust_env=False, http2=http2,
                    limits=httpx.Limits(max_connections=self.concurrency,
                                        max_keepalive_connections=self.concurrency),
                    # httpx sends headers and body in two writes: with Nagle's algorithm the body then waits
                    # for the server's delayed ACK (~40 ms a request on a kept-alive connection)
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                )
                self._client = httpx.Client(
                    transport=transport, trust_env=False, follow_redirects=False,
                    timeout=httpx.Timeout(self.timeout),
                    headers={"Content-Type": "application/json", "Accept": "application/json",
                             "User-Agent": "cfx"},
                )
            return self._client

    # ----------------------------------------------------------------------- protocol
    def _probe(self) -> None:
        """An empty request at load: checks that the server is there and authorized, and learns labels.

        Only nobody listening, TLS and 401/403 (and redirects, which are never followed) stop cfx here. Any
        other outcome (an error status, a closed connection, no answer, a body that is not an answer) means
        the server does not answer empty batches: labels then come with the first answer.
        """
        try:
            body = self._send({"images": []}, probe=True)
        except _Failure as exc:
            if exc.kind in (FATAL, UNREACHABLE):
                raise UsageError(self._redact(str(exc))) from None
            return
        try:
            _, labels, size = parse_answer(body, 0, len(self.labels) if self.labels_known else None,
                                           self.spec, self.returns_logits, self.raw_answers)
        except ClassifierError:
            return
        self._learn(labels)
        if self.input_size is None and size is not None:
            self.input_size = size

    def _post_batch(self, images: list[str]):
        try:
            body = self._send({"images": images})
        except _Failure as exc:
            # an error status may come from one image (a 500 for a bad input, a 422, a 413): halve the batch
            raise (RefusedBatch if exc.kind == ANSWERED else ClassifierError)(str(exc)) from None
        try:
            known = len(self.labels) if self.labels_known else None
            probs, labels, _ = parse_answer(body, len(images), known, self.spec, self.returns_logits,
                                            self.raw_answers)
        except ClassifierError as exc:
            raise RefusedBatch(self._redact(str(exc))) from None
        self._learn(labels, probs.shape[1])
        return probs

    def _send(self, payload: dict, probe: bool = False) -> bytes:
        """POST with retries; returns the body of a 200 answer or raises :class:`_Failure` with the server's
        message (redacted). The probe retries only while nobody listens (a server still starting)."""
        data = json.dumps(payload).encode()
        attempts = 1 + self.retries
        last: _Failure | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if last is not None and last.retry_after is not None:
                    delay = max(delay, last.retry_after)
                time.sleep(min(delay, MAX_BACKOFF_SECONDS))
            try:
                return self._attempt(data)
            except _Failure as exc:
                last = exc
                if not exc.retry or (probe and exc.kind != UNREACHABLE):
                    break
        assert last is not None
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        raise _Failure(self._redact(f"{self.spec}: {last}{tries}"), last.kind, last.retry)

    def _attempt(self, data: bytes) -> bytes:
        import httpx

        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            with self._http().stream("POST", self._url, content=data, headers=headers) as resp:
                body = bytearray()
                for piece in resp.iter_bytes():
                    body += piece
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise _Failure(f"answer larger than {MAX_RESPONSE_BYTES >> 20} MiB", ANSWERED,
                                       retry=False)
                status = resp.status_code
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except httpx.ConnectTimeout:
            raise _Failure(f"could not connect within {self.timeout:g}s (timeout)", UNREACHABLE,
                           retry=True) from None
        except httpx.TimeoutException:
            raise _Failure(f"no answer within {self.timeout:g}s (timeout)", SILENT, retry=True) from None
        except httpx.ConnectError as exc:
            tls = _cause(exc, ssl.SSLError)
            if isinstance(tls, ssl.SSLCertVerificationError):
                raise _Failure(f"TLS certificate not trusted ({tls.verify_message})", FATAL, retry=False) \
                    from None
            if tls is not None:
                raise _Failure(f"TLS handshake failed ({tls.reason or tls})", FATAL, retry=False) from None
            raise _Failure(f"connection failed ({_reason(exc)})", UNREACHABLE, retry=True) from None
        except httpx.TransportError as exc:  # connected, then closed or reset without an answer
            raise _Failure(f"connection failed ({_reason(exc)})", SILENT, retry=True) from None
        body = bytes(body)
        if status == 200:
            return body
        message = error_text(body)
        if status >= 500 or status == 429:
            raise _Failure(f"HTTP {status}: {message}", THROTTLED if status == 429 else ANSWERED, retry=True,
                           retry_after=retry_after)
        if status in (401, 403):
            hint = "check CFX_HTTP_TOKEN" if self._token else "set CFX_HTTP_TOKEN"
            raise _Failure(f"HTTP {status} (not authorized; {hint}): {message}", FATAL, retry=False)
        if 300 <= status < 400:
            raise _Failure(f"HTTP {status}: redirects are not followed; use the final URL", FATAL, retry=False)
        if status == 413:
            raise _Failure(f"HTTP 413: request too large; lower #batch_size ({message})", ANSWERED, retry=False)
        raise _Failure(f"HTTP {status}: {message}", ANSWERED, retry=False)


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in the ``__cause__``/``__context__`` chain (httpx wraps httpcore,
    which wraps the socket's or ssl's error)."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, kind):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _reason(exc: BaseException) -> str:
    os_error = _cause(exc, OSError)
    return (getattr(os_error, "strerror", None) or str(os_error or "") or str(exc)
            or type(exc).__name__).rstrip(".")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), MAX_BACKOFF_SECONDS) if value else None
    except ValueError:
        return None


@hookimpl
def register_classifier_adapters(register):
    register(HttpAdapter)
