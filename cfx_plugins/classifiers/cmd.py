"""``cmd:COMMAND ARGS…``: a long-running program speaking the subprocess protocol (black-box).

The command is split like a shell would (``shlex.split``) but run without one. cfx starts it once and,
per batch, writes one JSON line ``{"images": [<base64 PNG>, ...]}`` to its stdin and reads one line
``{"probabilities": [[...], ...], "labels": [...]?}`` or ``{"error": "..."}`` from its stdout. Anything
the program prints to stderr is kept (last lines) and quoted in error messages.

At start cfx sends an empty request (``{"images": []}``), ideally answered with the ``labels``. A program
that exits on it or answers garbage is restarted (not counted) and labels come with the first answer; only
a program that cannot start at all (it exits before reading the request) or does not answer within
``start_timeout`` stops cfx. A program that crashes is restarted, at most ``restarts`` times in all; one that
does not answer within ``timeout`` seconds is killed (and restarted for the next batch). A batch answered
with ``{"error": ...}`` or a malformed answer is retried by halves (:class:`~cfx_cli.protocol.RemoteClassifier`).
Options after ``#`` or from the environment:
``#timeout=60&start_timeout=120&restarts=3&batch_size=64&logits=0&size=HxW``.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.protocol import (
    TOKEN_ENV,
    Option,
    RefusedBatch,
    RemoteClassifier,
    answer_options,
    outcome,
    parse_answer,
    redactor,
    resolve_options,
    split_options,
)

try:  # POSIX: how many bytes of a request still wait, unread, in the program's stdin
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = termios = None

STDERR_LINES = 20  # kept for error messages


def cmd_options():
    return (
        Option("timeout", "float", 60.0, "seconds to wait for the answer to a batch", env="CFX_CMD_TIMEOUT"),
        Option("start_timeout", "float", 120.0, "seconds to wait for the answer to the first (empty) "
                                                "request, while the program loads its model",
               env="CFX_CMD_START_TIMEOUT"),
        Option("restarts", "int", 3, "how many times in all a crashed or hung program is restarted",
               env="CFX_CMD_RESTARTS"),
        Option("batch_size", "int", 64, "most images in one request", env="CFX_CMD_BATCH_SIZE"),
        *answer_options("program"),
    )


class CmdAdapter(ClassifierAdapter):
    name = "cmd"
    schemes = ("cmd",)
    summary = "long-running program over stdin/stdout JSON lines (black-box): cmd:python serve.py"

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        return CmdClassifier(spec, options)


class _Dead(Exception):
    """The process is gone (crashed, or killed after a timeout)."""


class _Process:
    """One running instance of the program with reader threads for stdout (lines) and stderr (tail)."""

    def __init__(self, argv: list[str], spec: str) -> None:
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, bufsize=0, close_fds=True)
        except FileNotFoundError:
            raise UsageError(f"classifier {spec}: command not found: {argv[0]}") from None
        except PermissionError:
            raise UsageError(f"classifier {spec}: {argv[0]}: permission denied (not executable?)") from None
        except OSError as exc:
            raise UsageError(f"classifier {spec}: cannot start {argv[0]}: {exc.strerror or exc}") from None
        self.started = time.monotonic()
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._write_failed: list[BaseException] = []
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="cfx-cmd-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="cfx-cmd-stderr"),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in iter(self.popen.stdout.readline, b""):
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        for line in iter(self.popen.stderr.readline, b""):
            self.stderr.append(line.decode("utf-8", "replace").rstrip())

    def request(self, line: bytes, timeout: float | None) -> bytes:
        """Send one line, return one answer line; raises :class:`_Dead` or :class:`TimeoutError`."""
        failed: list[BaseException] = []

        def write() -> None:  # in a thread: a program that stops reading must not block cfx forever
            try:
                self.popen.stdin.write(line)
                self.popen.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as exc:
                failed.append(exc)

        writer = threading.Thread(target=write, daemon=True, name="cfx-cmd-stdin")
        self._writer, self._write_failed = writer, failed
        writer.start()
        try:
            answer = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if answer is None:
            raise _Dead
        return answer

    def read_request(self) -> bool | None:
        """After the program exited: did it read the last request? None when this system cannot tell (Linux
        counts the bytes waiting in a pipe from its writing end; the BSDs and macOS do not)."""
        if self._writer is not None:
            self._writer.join(timeout=1.0)
        if self._write_failed:
            return False  # it was gone before the request could be written
        if fcntl is None or not sys.platform.startswith("linux"):
            return None
        try:
            waiting = struct.unpack("i", fcntl.ioctl(self.popen.stdin.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        except (OSError, ValueError):
            return None
        return waiting == 0

    def exit_code(self, wait: float = 2.0) -> int | None:
        try:
            return self.popen.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self, wait: float = 0.5) -> str:
        self._threads[1].join(timeout=wait)  # let the reader drain what the program wrote before dying
        tail = [x for x in self.stderr if x.strip()][-5:]
        return " | ".join(tail)[-600:]

    def stop(self, grace: float = 2.0) -> None:
        p = self.popen
        if p.poll() is None:
            try:
                p.stdin.close()  # well-behaved programs exit at end of input
            except OSError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for stream in (p.stdin, p.stdout, p.stderr):
            try:
                stream.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _stop_quietly(proc: _Process) -> None:
    try:
        proc.stop(grace=1.0)
    except Exception:
        pass


class CmdClassifier(RemoteClassifier):
    def __init__(self, spec: str, options: ClassifierOptions) -> None:
        base, raw = split_options(spec)
        self.spec = spec
        opts = resolve_options(spec, raw, cmd_options())
        command = base.split(":", 1)[1].strip()
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise UsageError(f"classifier {spec}: cannot split the command ({exc})") from None
        if not self.argv:
            raise UsageError(f"classifier {spec}: no command after cmd:")
        if opts["batch_size"] < 1:
            raise UsageError(f"classifier {spec}: batch_size must be at least 1")
        self.timeout = opts["timeout"] or None
        self.start_timeout = opts["start_timeout"] or None
        self.max_restarts = opts["restarts"]
        self.batch_size = opts["batch_size"]
        self.returns_logits = bool(opts["logits"] if opts["logits"] is not None else options.logits)
        self.raw_answers = options.raw_outputs
        self.input_size = opts["size"]
        self.labels = list(options.labels or [])
        self.labels_known = bool(self.labels)
        self.restarts = 0
        self.calls = 0
        self._redact = redactor(os.environ.get(TOKEN_ENV))
        self._lock = threading.Lock()
        self._proc: _Process | None = None
        self._finalizer = None
        self._start()
        self._probe()

    # ----------------------------------------------------------------------- Classifier API
    def _send_chunks(self, chunks):
        return [outcome(self._classify, chunk) for chunk in chunks]

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stop()
                self._proc = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None

    # ----------------------------------------------------------------------- process management
    def _start(self) -> None:
        self._proc = _Process(self.argv, self.spec)
        if self._finalizer is not None:
            self._finalizer.detach()
        # never leave the program running when cfx exits without close() (e.g. a usage error)
        self._finalizer = weakref.finalize(self, _stop_quietly, self._proc)

    def _restart(self, why: str) -> None:
        if self.restarts >= self.max_restarts:
            raise ClassifierError(self._redact(
                f"{self.spec}: {why}; not restarting it (restarted {self.restarts} times already, "
                f"limit {self.max_restarts}: #restarts=N)"))
        self.restarts += 1
        self._start()

    def _exchange(self, line: bytes, timeout: float | None) -> bytes:
        """One request/answer on the running process; dead or hung processes raise ClassifierError."""
        proc = self._proc
        if proc is None or proc.popen.poll() is not None:
            self._restart("the program is not running")
            proc = self._proc
        try:
            return proc.request(line, timeout)
        except TimeoutError:
            proc.kill()
            tail = proc.stderr_tail()
            self._proc = None  # restarted (within the limit) for the next batch
            raise ClassifierError(self._redact(
                f"{self.spec}: no answer within {timeout:g}s; killed the program"
                + (f" (stderr: {tail})" if tail else ""))) from None
        except _Dead:
            code = proc.exit_code()
            tail = proc.stderr_tail()
            self._proc = None
            why = f"the program exited with code {code}" + (f" (stderr: {tail})" if tail else "")
            raise _Dead(why) from None

    def _request(self, payload: dict, timeout: float | None) -> bytes:
        line = (json.dumps(payload) + "\n").encode()
        with self._lock:
            try:
                return self._exchange(line, timeout)
            except _Dead as first:
                # A crash: restart (bounded) and try this batch once more.
                self._restart(str(first))
                try:
                    return self._exchange(line, timeout)
                except _Dead as second:
                    raise ClassifierError(self._redact(f"{self.spec}: {second}")) from None

    def _probe(self) -> None:
        """The empty start-up request: learns labels (and input size) when the program answers it.

        A program that exits on it or answers something that is not a protocol answer does not answer empty
        batches: it is restarted (not counted) and labels come with the first answer. Only a program that
        cannot start (it exits before reading the request) or answers nothing in time stops cfx.
        """
        proc = self._proc
        try:
            with self._lock:
                answer = self._exchange(b'{"images": []}\n', self.start_timeout)
        except _Dead as exc:
            read = proc.read_request()
            if read is False:
                self.close()
                raise UsageError(self._redact(
                    f"classifier {self.spec}: {exc} at start-up, before reading any request")) from None
            if read is None:
                self._start_again(time.monotonic() - proc.started, str(exc))
            else:
                self._start()  # it read the empty request and exited: it does not answer empty batches
            return
        except ClassifierError as exc:
            raise UsageError(self._redact(f"classifier {exc} (start-up request {{\"images\": []}})")) \
                from None
        if not _is_json(answer):  # stdout is out of step with the requests: start afresh
            self._proc.kill()
            self._start()
            return
        try:
            _, labels, size = parse_answer(answer, 0, len(self.labels) if self.labels_known else None,
                                           self.spec, self.returns_logits, self.raw_answers)
        except ClassifierError:
            return  # an error or a malformed answer to the empty batch: labels come with the first answer
        self._learn(labels)
        if self.input_size is None and size is not None:
            self.input_size = size

    def _start_again(self, lived: float, why: str) -> None:
        """Restart after the program exited on the start-up request where the system cannot tell whether it read
        it. One that exits again without being asked anything within 1.5× the time the first one lived (+1 s)
        cannot start at all: a usage error quoting its stderr."""
        self._start()
        grace = 1.5 * lived + 1.0
        code = self._proc.exit_code(wait=min(grace, self.start_timeout or grace))
        if code is None:
            return
        tail = self._proc.stderr_tail()
        self.close()
        raise UsageError(self._redact(
            f"classifier {self.spec}: the program exited with code {code} at start-up, before any request"
            + (f" (stderr: {tail})" if tail else f"; before that, {why}")))

    def _classify(self, images: list[str]):
        answer = self._request({"images": images}, self.timeout)
        try:
            known = len(self.labels) if self.labels_known else None
            probs, labels, _ = parse_answer(answer, len(images), known, self.spec, self.returns_logits,
                                            self.raw_answers)
        except ClassifierError as exc:
            if not _is_json(answer):
                # stdout is out of step with our requests (a stray print?): start afresh for the next batch
                with self._lock:
                    if self._proc is not None:
                        self._proc.kill()
                        self._proc = None
                raise ClassifierError(self._redact(
                    f"{exc} (stdout must carry protocol lines only: log to stderr)")) from None
            raise RefusedBatch(self._redact(str(exc))) from None  # an error answer: maybe one image's fault
        self._learn(labels, probs.shape[1])
        return probs


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


@hookimpl
def register_classifier_adapters(register):
    register(CmdAdapter)
