"""``http://…`` / ``https://…``: a classifier behind the HTTP protocol of DESIGN.md (black-box).

Each request is ``POST URL`` with ``{"images": [<base64 PNG>, ...]}``; the answer is
``{"probabilities": [[...], ...], "labels": [...]?}``. ``CFX_HTTP_TOKEN`` (environment only) is sent as
``Authorization: Bearer``; it never appears in messages, logs or run files. Redirects are not followed
(they could carry the token elsewhere).

Options go after ``#`` (a URL fragment is never sent to the server) or in environment variables:
``#timeout=30&retries=3&backoff=0.5&batch_size=16&concurrency=4&logits=0&size=HxW``. 5xx and 429
answers, timeouts and connection errors are retried with exponential backoff and jitter; a malformed
answer or another 4xx fails the batch at once with a message quoting what was wrong.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from urllib.parse import urlsplit

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import RemoteClassifier

MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_BACKOFF_SECONDS = 60.0


def http_options():
    from cfx_cli.protocol import Option

    return (
        Option("timeout", "float", 30.0, "seconds to wait for connecting and for each answer",
               env="CFX_HTTP_TIMEOUT"),
        Option("retries", "int", 3, "retries of a request after a 5xx/429 answer, a timeout or a "
                                    "connection error", env="CFX_HTTP_RETRIES"),
        Option("backoff", "float", 0.5, "delay before the first retry in seconds; doubles each retry, "
                                        "times a random factor in [0.5, 1.5)", env="CFX_HTTP_BACKOFF"),
        Option("batch_size", "int", 16, "most images in one request", env="CFX_HTTP_BATCH_SIZE"),
        Option("concurrency", "int", 4, "most requests in flight at once", env="CFX_HTTP_CONCURRENCY"),
        Option("logits", "bool", None, "the server answers logits: softmax them (default false)"),
        Option("size", "size", None, "resize inputs to N or HxW before sending (default: the server's "
                                     "input_size field, else unchanged)"),
    )


class HttpAdapter(ClassifierAdapter):
    name = "http"
    schemes = ("http", "https")
    summary = "remote classifier over HTTP (black-box): http://HOST:PORT/PATH[#timeout=30&retries=3]"

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        return HttpClassifier(spec, options)


class _Failure(Exception):
    """One attempt failed; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool, retry_after: float | None = None,
                 fatal: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after
        self.fatal = fatal  # a configuration problem (authorization, redirect, TLS): no use going on


class HttpClassifier(RemoteClassifier):
    def __init__(self, spec: str, options: ClassifierOptions) -> None:
        from cfx_cli.protocol import TOKEN_ENV, redact_url, redactor, resolve_options, split_options

        base, raw = split_options(spec)
        self.spec = redact_url(spec)
        opts = resolve_options(self.spec, raw, http_options())
        url = urlsplit(base)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UsageError(f"classifier {self.spec}: expected http://HOST[:PORT]/PATH")
        if opts["batch_size"] < 1 or opts["concurrency"] < 1:
            raise UsageError(f"classifier {self.spec}: batch_size and concurrency must be at least 1")
        self.scheme, self.host = url.scheme, url.hostname
        try:
            self.port = url.port
        except ValueError:
            raise UsageError(f"classifier {self.spec}: invalid port") from None
        self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.timeout = opts["timeout"] or None
        self.retries = opts["retries"]
        self.backoff = opts["backoff"]
        self.batch_size = opts["batch_size"]
        self.concurrency = opts["concurrency"]
        self.returns_logits = bool(opts["logits"] if opts["logits"] is not None else options.logits)
        self._token = os.environ.get(TOKEN_ENV) or None
        self._redact = redactor(self._token, url.password)
        self._pool = None
        self._lock = threading.Lock()
        self.calls = 0
        self.labels = list(options.labels or [])
        self.labels_known = bool(self.labels)
        self.input_size = opts["size"]
        self._probe()

    # ----------------------------------------------------------------------- Classifier API
    def _send_chunks(self, chunks):
        if len(chunks) == 1:
            return [self._post_batch(chunks[0])]
        return list(self._executor().map(self._post_batch, chunks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ----------------------------------------------------------------------- protocol
    def _executor(self):
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="cfx-http")
            return self._pool

    def _probe(self) -> None:
        """An empty request at load: checks the server is reachable and authorized, and learns labels.

        A server that does not accept empty batches is fine: labels then come with the first answer.
        """
        from cfx_cli.protocol import parse_answer

        try:
            body = self._send({"images": []}, retry_statuses=False)
        except _Failure as exc:
            if exc.retry or exc.fatal:
                raise UsageError(self._redact(str(exc))) from None
            return
        try:
            _, labels, size = parse_answer(body, 0, len(self.labels) if self.labels_known else None,
                                           self.spec, self.returns_logits)
        except ClassifierError:
            return
        self._learn(labels)
        if self.input_size is None and size is not None:
            self.input_size = size

    def _post_batch(self, images: list[str]):
        from cfx_cli.protocol import parse_answer

        body = self._send({"images": images}, retry_statuses=True)
        try:
            known = len(self.labels) if self.labels_known else None
            probs, labels, _ = parse_answer(body, len(images), known, self.spec, self.returns_logits)
        except ClassifierError as exc:
            raise ClassifierError(self._redact(str(exc))) from None
        self._learn(labels, probs.shape[1])
        return probs

    def _send(self, payload: dict, retry_statuses: bool) -> bytes:
        """POST with retries; returns the body of a 200 answer or raises (:class:`_Failure` for the probe,
        :class:`ClassifierError` otherwise) with the server's message."""
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
                return self._attempt(data, retry_statuses)
            except _Failure as exc:
                last = exc
                if not exc.retry:
                    break
        assert last is not None
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        message = self._redact(f"{self.spec}: {last}{tries}")
        if not retry_statuses:
            raise _Failure(message, last.retry, fatal=last.fatal)
        raise ClassifierError(message)

    def _attempt(self, data: bytes, retry_statuses: bool) -> bytes:
        import http.client
        import ssl

        from cfx_cli.protocol import error_text

        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "cfx"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=data, headers=headers)
            resp = conn.getresponse()
            body = resp.read(MAX_RESPONSE_BYTES + 1)
            status = resp.status
            retry_after = _retry_after(resp.getheader("Retry-After"))
        except TimeoutError:
            raise _Failure(f"no answer within {self.timeout:g}s (timeout)", retry=True) from None
        except ssl.SSLCertVerificationError as exc:
            why = f"TLS certificate not trusted ({exc.verify_message})"
            raise _Failure(why, retry=False, fatal=True) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise _Failure(f"connection failed ({reason})", retry=True) from None
        finally:
            conn.close()
        if len(body) > MAX_RESPONSE_BYTES:
            raise _Failure(f"answer larger than {MAX_RESPONSE_BYTES >> 20} MiB", retry=False)
        if status == 200:
            return body
        message = error_text(body)
        if status >= 500 or status == 429:
            raise _Failure(f"HTTP {status}: {message}", retry=retry_statuses, retry_after=retry_after)
        if status in (401, 403):
            hint = "check CFX_HTTP_TOKEN" if self._token else "set CFX_HTTP_TOKEN"
            raise _Failure(f"HTTP {status} (not authorized; {hint}): {message}", retry=False, fatal=True)
        if 300 <= status < 400:
            raise _Failure(f"HTTP {status}: redirects are not followed; use the final URL", retry=False,
                           fatal=True)
        if status == 413:
            raise _Failure(f"HTTP 413: request too large; lower #batch_size ({message})", retry=False)
        raise _Failure(f"HTTP {status}: {message}", retry=False)


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), MAX_BACKOFF_SECONDS) if value else None
    except ValueError:
        return None


@hookimpl
def register_classifier_adapters(register):
    register(HttpAdapter)
