"""What the HTTP and subprocess classifier protocols share: PNG/base64 payloads, response validation and secret
redaction (spec options live in :mod:`cfx_cli.spec_options`; imported here for the adapters that import them here).

Wire format (DESIGN.md): requests are ``{"images": ["<base64 PNG>", ...]}``; answers are
``{"probabilities": [[p0, p1, ...], ...]}`` with optional ``"labels"``, or ``{"error": "..."}``.
``cfx serve`` also sends the optional ``"input_size": [H, W]`` so that clients can work at the
model's resolution.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from cfx_cli.classifiers import Classifier, PartialClassifierError, check_probabilities
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.spec_options import Option as Option
from cfx_cli.spec_options import resolve_options as resolve_options
from cfx_cli.spec_options import split_options as split_options

if TYPE_CHECKING:  # numpy and torch are imported where used: plugins import this module at registration
    import numpy as np
    import torch

TOKEN_ENV = "CFX_HTTP_TOKEN"


# --------------------------------------------------------------------------- spec options
def answer_options(who: str) -> tuple[Option, Option]:
    """The options of every remote adapter about ``who``'s answers (``who``: "program", "server")."""
    return (
        Option("logits", "bool", None, f"the {who} answers logits: softmax them (default false)"),
        Option("size", "size", None, f"resize inputs to N or HxW before sending (default: the {who}'s "
                                     "input_size field, else unchanged)"),
    )


# --------------------------------------------------------------------------- images on the wire
def encode_images(images: torch.Tensor) -> list[str]:
    """(N, 3, H, W) float in [0, 1] → base64 PNGs (8-bit: cfx classifies 8-bit images throughout)."""
    import numpy as np
    from PIL import Image

    arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray((a * 255.0 + 0.5).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_image(data: str, max_pixels: int | None = None) -> np.ndarray:
    """A base64 PNG/JPEG → float32 RGB (H, W, 3) in [0, 1], decoded exactly as ``cfx`` decodes files."""
    import binascii
    import warnings

    from PIL import Image, UnidentifiedImageError

    from cfx_cli.images import MAX_PIXELS, _to_rgb_array

    limit = max_pixels or MAX_PIXELS
    if not isinstance(data, str):
        raise ValueError(f"expected a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                if img.size[0] * img.size[1] > limit:
                    raise ValueError(f"image too large ({img.size[0]}×{img.size[1]})")
                img.load()
                return _to_rgb_array(img)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("not a readable image") from None


# --------------------------------------------------------------------------- answers
def quote(text: str | bytes, limit: int = 200) -> str:
    """A short, single-line excerpt of what a server or program sent, for error messages."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "…")


def error_text(body: bytes) -> str:
    """The server's message: the ``error`` field of a JSON body, else the body itself (shortened)."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return quote(obj["error"], 300)[1:-1]
    except (ValueError, UnicodeDecodeError):
        pass
    return quote(body, 300)[1:-1] or "(empty body)"


def parse_answer(body: bytes | str, n_images: int, n_labels: int | None, source: str, logits: bool,
                 raw: bool = False) -> tuple[torch.Tensor, list[str] | None, tuple[int, int] | None]:
    """Validate a protocol answer → (probabilities (N, K), labels or None, input_size or None).

    ``raw`` (``#binary``/``#attribute``): the columns are one model's sigmoid outputs (probabilities, or logits
    with ``logits``), returned as they are: rows need not sum to 1. ``{"error": ...}`` and anything malformed raise
    :class:`ClassifierError` quoting what was wrong.
    """
    import torch

    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ClassifierError(f"{source}: malformed response (not JSON): {quote(body)}") from None
    if not isinstance(obj, dict):
        raise ClassifierError(f"{source}: malformed response (expected a JSON object): {quote(str(obj))}")
    if obj.get("error") is not None:
        raise ClassifierError(f"{source}: {quote(str(obj['error']), 300)[1:-1]}")
    probs = obj.get("probabilities")
    if not isinstance(probs, list) or not all(isinstance(r, list) for r in probs):
        raise ClassifierError(
            f"{source}: malformed response (no \"probabilities\" list of rows): {quote(json.dumps(obj))}"
        )
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)
                               or not labels):
        raise ClassifierError(f"{source}: malformed response (\"labels\" must be a list of strings)")
    size = obj.get("input_size")
    if size is not None:
        ok = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        size = (size[0], size[1]) if ok else None
    try:
        width = len(probs[0]) if probs else len(labels or [])
        if any(len(r) != width for r in probs):
            raise ValueError("rows of different lengths")
        t = torch.tensor(probs, dtype=torch.float64).reshape(len(probs), width)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ClassifierError(f"{source}: malformed response (probabilities: {exc})") from None
    if labels is not None and n_labels is not None and len(labels) != n_labels:
        raise ClassifierError(f"{source}: answered {len(labels)} labels, expected {n_labels}")
    if raw:
        return _check_outputs(t.float(), n_images, n_labels, source, logits), labels, size
    if logits and t.numel():
        t = torch.softmax(t, dim=1)
    k = n_labels if n_labels is not None else (len(labels) if labels is not None else None)
    return check_probabilities(t.float(), n_images, k, source), labels, size


def _check_outputs(t: torch.Tensor, n_images: int, width: int | None, source: str, logits: bool) -> torch.Tensor:
    """A raw answer: (N, M), finite, and in [0, 1] unless it holds logits."""
    import torch

    if t.shape[0] != n_images or (width is not None and t.shape[1] != width):
        raise ClassifierError(f"{source}: expected outputs of shape ({n_images}, {width or 'M'}), got "
                              f"{tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ClassifierError(f"{source}: outputs contain NaN or infinity")
    if not logits and ((t < -1e-6) | (t > 1 + 1e-6)).any():
        raise ClassifierError(f"{source}: sigmoid outputs outside [0, 1] (logits? use the adapter's logits option)")
    return t


# --------------------------------------------------------------------------- secrets
def redactor(*secrets: str | None) -> Callable[[str], str]:
    """A function that removes every given secret (and its base64 form) from a text."""
    values = [s for s in secrets if s]
    values += [base64.b64encode(s.encode()).decode() for s in values]

    def redact(text: str) -> str:
        for s in values:
            text = text.replace(s, "<redacted>")
        return text

    return redact


def redact_url(url: str) -> str:
    """Drop ``user:password@`` from a URL: run.json records the spec; credentials go in CFX_HTTP_TOKEN."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, "<redacted>@" + host, parts.path, parts.query, parts.fragment))


def resize_batch(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize (N, 3, H, W) to ``size`` as cfx resizes inputs (antialiased bicubic); no-op when it fits."""
    import numpy as np
    import torch

    from cfx_cli.images import resize

    x = images.detach().float().cpu()
    if size is None or tuple(x.shape[-2:]) == tuple(size) or len(x) == 0:
        return x
    arrays = [resize(a.permute(1, 2, 0).numpy(), size) for a in x]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def unknown_labels_error(spec: str) -> UsageError:
    return UsageError(f"classifier {spec} does not name its classes; pass --labels FILE (one name per line) "
                      "or use an index or auto as the target")


class RefusedBatch(ClassifierError):
    """The server or program answered a batch with a refusal (an error status or ``error`` answer, a malformed
    answer). One of its images may be the cause, so :class:`RemoteClassifier` retries the batch by halves.
    Failures to answer at all (timeouts, lost connections, crashes) are plain :class:`ClassifierError`: halving
    would only multiply the waiting (and, for ``cmd:``, the restarts)."""


class RemoteClassifier(Classifier):
    """Shared behaviour of the black-box protocol adapters (``http``, ``cmd``): resize, encode as PNG, send in
    chunks of ``batch_size``, concatenate; labels may only become known from the first answer.

    A chunk that is refused (:class:`RefusedBatch`) is sent again as two halves, down to single images, so
    that only the images the server really refuses fail (:class:`PartialClassifierError`). A chunk of m
    images costs at most 2m - 1 requests (each with the adapter's own retries), a batch of n at most 2n - 1.
    """

    batch_size: int = 64
    labels_known: bool = False
    raw_answers: bool = False  # #binary/#attribute: answers are sigmoid outputs (``ClassifierOptions.raw_outputs``)
    _labels_lock = threading.Lock()  # chunks may be answered on several threads (http)

    def _learn(self, labels: list[str] | None, width: int | None = None) -> None:
        """Fix the labels from an answer: the names it gives, else indices for its ``width`` columns. The first
        answer that says anything decides; later ones are checked against it by ``parse_answer``."""
        with self._labels_lock:
            if self.labels_known:
                return
            if labels:
                self.labels = list(labels)
            elif width is not None:
                self.labels = [str(i) for i in range(width)]
            else:
                return
            self.labels_known = True

    def _send_chunks(self, chunks: list[list[str]]) -> list[torch.Tensor | ClassifierError]:
        """Per chunk of base64 PNGs, its (n, K) probabilities or the :class:`ClassifierError` it failed with;
        subclasses decide how chunks travel."""
        raise NotImplementedError

    def predict_proba(self, images):
        import torch

        x = resize_batch(images, self.input_size)
        if len(x) == 0:
            return torch.zeros(0, len(self.labels))
        encoded = encode_images(x)
        n = len(encoded)
        rows: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        pending = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        while pending:  # one round per level of halving: a round's chunks may travel concurrently
            halves: list[list[int]] = []
            outcomes = self._send_chunks([[encoded[i] for i in idx] for idx in pending])
            for idx, out in zip(pending, outcomes, strict=True):
                if isinstance(out, RefusedBatch) and len(idx) > 1:
                    h = len(idx) // 2
                    halves += [idx[:h], idx[h:]]
                elif isinstance(out, ClassifierError):
                    errors.update(dict.fromkeys(idx, str(out)))
                else:
                    rows.update(zip(idx, out, strict=True))
            pending = halves
        self.calls += len(rows)
        width = next(iter(rows.values())).shape[0] if rows else len(self.labels)
        probs = torch.full((n, width), float("nan"))
        for i, row in rows.items():
            probs[i] = row
        if errors:
            raise PartialClassifierError(probs, errors)
        return probs

    def scores(self, images):
        """The answers' columns as logits (``#binary``/``#attribute``; failed rows stay NaN)."""
        import torch

        if not self.raw_answers:
            return super().scores(images)
        as_logits = (lambda t: t) if self.returns_logits else (lambda t: torch.logit(t, eps=1e-6))
        try:
            return as_logits(self.predict_proba(images))
        except PartialClassifierError as exc:
            raise PartialClassifierError(as_logits(exc.probabilities), exc.errors) from None

    def label_index(self, label: str) -> int:
        if not self.labels_known:
            raise unknown_labels_error(self.spec)
        return super().label_index(label)


def outcome(send: Callable[[list[str]], torch.Tensor], chunk: list[str]) -> torch.Tensor | ClassifierError:
    """``send(chunk)``, or the :class:`ClassifierError` it raised (other errors propagate)."""
    try:
        return send(chunk)
    except ClassifierError as exc:
        return exc
