"""The classifier protocol, spec parsing and label handling.

A :class:`Classifier` takes float32 images (N, 3, H, W) in [0, 1] and returns class probabilities.
White-box classifiers (capability ``gradients``) also return differentiable logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.plugins import get_registry
from cfx_cli.spec_options import OUTPUT_OPTIONS, resolve_options, split_options

if TYPE_CHECKING:
    import torch

DEFAULT_SPEC = "demo:digits"
#: the ImageNet normalisation (torchvision's and timm's IMAGENET_DEFAULT_MEAN/STD): HiT's default, the embedding
#: metrics, DiME's VGG loss
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifierOptions:
    device: str = "cpu"
    labels: list[str] | None = None  # --labels FILE overrides the model's own names
    trust_pickle: bool = False
    logits: bool = False  # the model returns logits: softmax them
    #: cfx reads the model's raw outputs (``#binary``/``#attribute``), not its outputs as classes
    raw_outputs: bool = False


class Classifier:
    """Base class. ``capabilities`` always holds ``probabilities``; ``gradients`` for white-box models."""

    labels: list[str]
    input_size: tuple[int, int] | None = None  # (H, W) the model expects; None = any
    capabilities: frozenset[str] = frozenset({"probabilities"})
    spec: str = ""  # how the user named it (no secrets)
    calls: int = 0  # forward passes (images) served, for NFE accounting

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] on any device (cfx passes ``context.device``; an adapter moves the images
        where its model runs) → (N, K) float32 probabilities on the CPU, rows summing to 1; not differentiable."""
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable (N, K) logits on the classifier's device, which is ``context.device`` (white-box
        classifiers only, capability ``gradients``)."""
        raise ClassifierError(f"classifier {self.spec} is a black box: it gives no gradients")

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """(N, M) the model's raw outputs as logits, not normalised across outputs (a sigmoid model's logits; a
        model declared to return probabilities p gives log(p / (1 − p))): what ``#binary``/``#attribute`` read.
        Differentiable for white-box classifiers; adapters whose answers are class probabilities lack it."""
        raise UsageError(f"classifier {self.spec}: #binary/#attribute need the model's raw outputs, which this "
                         "adapter does not give (its answers are class probabilities: answer two classes instead)")

    def close(self) -> None:
        """Release processes, sessions or connections."""

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "labels": list(self.labels),
            "input_size": list(self.input_size) if self.input_size else None,
            "capabilities": sorted(self.capabilities),
        }

    def label_index(self, label: str) -> int:
        """A class name or an index → index; unknown labels are usage errors listing the known ones."""
        return resolve_label(label, self.labels, self.spec)


class PartialClassifierError(ClassifierError):
    """Some images of a batch could not be classified, the others were: ``probabilities`` has one row per
    image (NaN rows for the failed ones), ``errors`` maps each failed row's index to its message. Remote
    adapters raise it after retrying a refused batch by halves, so that a caller can fail only those inputs."""

    def __init__(self, probabilities: torch.Tensor, errors: dict[int, str]) -> None:
        first = errors[min(errors)]
        if len(errors) == len(probabilities) and len(set(errors.values())) == 1:
            message = first
        else:
            message = f"{first} ({len(errors)} of {len(probabilities)} images failed)"
        super().__init__(message)
        self.probabilities = probabilities
        self.errors = errors


def predict_partly(classifier: Classifier, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
    """(probabilities, {row: message} for the rows that failed): a batch that fails as a whole still raises."""
    try:
        return classifier.predict_proba(images), {}
    except PartialClassifierError as exc:
        return exc.probabilities, exc.errors


class ClassifierAdapter:
    """Base class of adapters: turns a spec such as ``onnx:model.onnx`` into a :class:`Classifier`."""

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    summary: ClassVar[str] = ""
    #: ``{"probabilities"}`` or ``{"probabilities", "gradients"}``
    capabilities: ClassVar[frozenset[str]] = frozenset({"probabilities"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        raise NotImplementedError


def spec_scheme(spec: str) -> str:
    if "://" in spec:
        return spec.split("://", 1)[0].lower()
    if ":" not in spec:
        raise UsageError(
            f"classifier spec {spec!r} has no scheme; expected e.g. demo:digits, torchscript:PATH, "
            "python:MODULE:FACTORY, onnx:PATH, http://HOST/PATH or cmd:COMMAND"
        )
    return spec.split(":", 1)[0].lower()


def get_adapter(spec: str) -> ClassifierAdapter:
    scheme = spec_scheme(spec)
    adapters = get_registry().classifier_adapters
    if scheme not in adapters:
        known = ", ".join(sorted(adapters)) or "none"
        raise UsageError(f"unknown classifier scheme {scheme!r} in {spec!r} (installed: {known})")
    return adapters[scheme][0]()


def load_classifier(spec: str, options: ClassifierOptions) -> Classifier:
    """The classifier a spec names; ``#binary=1`` / ``#attribute=K`` (any adapter) wrap it in a
    :class:`SigmoidClassifier`, and the adapter sees the spec without them."""
    base, raw = split_options(spec)
    mine = {k: raw.pop(k) for k in [o.name for o in OUTPUT_OPTIONS] if k in raw}
    opts = resolve_options(spec, mine, OUTPUT_OPTIONS)
    inner_spec = base + ("#" + "&".join(f"{k}={v}" for k, v in raw.items()) if raw else "")
    if opts["binary"] and opts["attribute"] is not None:
        raise UsageError(f"classifier {spec}: #binary and #attribute exclude each other (#binary=1: the model has "
                         "one output; #attribute=K: one of its several outputs)")
    if not opts["binary"] and opts["attribute"] is None:
        classifier = get_adapter(inner_spec).load(inner_spec if mine else spec, options)
        if options.labels is not None:
            classifier.labels = list(options.labels)
        return classifier
    try:
        inner = get_adapter(inner_spec).load(inner_spec, dataclasses.replace(options, labels=None, raw_outputs=True))
    except UsageError as exc:  # name the spec as the user wrote it
        raise UsageError(str(exc).replace(inner_spec, spec)) from None
    try:
        return SigmoidClassifier(inner, spec, opts["attribute"], options.labels)
    except BaseException:
        inner.close()
        raise


class WrappedClassifier(Classifier):
    """A classifier built around another one (``inner``), which serves its input size and counts its calls."""

    inner: Classifier

    @property
    def input_size(self) -> tuple[int, int] | None:  # type: ignore[override]
        return self.inner.input_size

    @property
    def calls(self) -> int:  # type: ignore[override]
        return self.inner.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.inner.calls = value


class SigmoidClassifier(WrappedClassifier):
    """Two classes from one sigmoid logit l of a model (``#binary=1``: its only output; ``#attribute=K``: output K
    of a multi-label model): probabilities (1 − σ(l), σ(l)), and for white-box models the logits (−l/2, l/2), whose
    difference l makes :func:`target_score` the authors' ±l (DiME) and the cross-entropy their BCE (ACE)."""

    def __init__(self, inner: Classifier, spec: str, attribute: str | None, labels: list[str] | None) -> None:
        self.inner, self.spec = inner, spec
        self.capabilities = inner.capabilities
        if hasattr(inner, "module"):  # ScoreCAM/Grad-CAM name the layers of the wrapped module
            self.module = inner.module
        self.width = width = self._probe()
        self.index, self.attribute, pair = 0, None, None
        self.outputs: list[str] | None = None  # the names of the model's outputs, where known
        if attribute is None:
            if width != 1:
                raise UsageError(f"classifier {spec}: #binary=1 needs a model with one output per image; this one "
                                 f"returns {width} (#attribute=K explains one output of a multi-label model)")
            # the user's names, else the model's: its two classes, or the one thing its logit detects
            named = len(inner.labels) == 2 or not _unnamed(inner.labels, 1)
            given = labels if labels is not None else (inner.labels if named else None)
            if given is not None and len(given) not in (1, 2):
                raise UsageError(f"classifier {spec}: --labels gives {len(given)} names; #binary=1 takes 2 (the "
                                 "classes) or 1 (what the logit detects)")
            if given is not None and len(given) == 2:
                pair = list(given)
            elif given is not None:
                self.attribute = given[0]
        else:
            outputs = None
            if labels is not None and len(labels) == width:
                outputs = list(labels)
            elif labels is not None and len(labels) == 2:
                pair = list(labels)
            elif labels is not None:
                raise UsageError(f"classifier {spec}: --labels gives {len(labels)} names; #attribute takes {width} "
                                 "(one per model output) or 2 (the classes)")
            if outputs is None and not _unnamed(inner.labels, width):
                outputs = list(inner.labels)
            self.index = _attribute_index(attribute, outputs, width, spec)
            self.attribute = outputs[self.index] if outputs else str(self.index)
            self.outputs = outputs
        self.labels = pair or ([f"not-{self.attribute}", self.attribute] if self.attribute else ["0", "1"])

    def _probe(self) -> int:
        """The number of the model's outputs, from one forward pass on a black image at its input size (not
        counted in ``calls``): a model that is not what the option says fails here, before any work."""
        import torch

        h, w = self.inner.input_size or (224, 224)
        before = self.inner.calls
        try:
            with torch.no_grad():
                out = _columns(self.inner.scores(torch.zeros(1, 3, h, w)))
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"classifier {self.spec}: a test forward pass on a {h}×{w} image failed "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:150]}); give the input size "
                             "with #size=HxW") from None
        self.inner.calls = before
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            raise UsageError(f"classifier {self.spec}: the model must return (N, M) or (N,) outputs, got "
                             f"{tuple(getattr(out, 'shape', ()))} for one image")
        return int(out.shape[1])

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) the explained output l (differentiable for white-box models)."""
        import torch

        if images.shape[0] == 0:
            return torch.zeros(0)
        out = _columns(self.inner.scores(images))
        if out.ndim != 2 or tuple(out.shape) != (images.shape[0], self.width):
            raise ClassifierError(f"{self.spec}: the model returned outputs of shape {tuple(out.shape)} for "
                                  f"{images.shape[0]} images; expected ({images.shape[0]}, {self.width})")
        return out[:, self.index]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        if "gradients" not in self.capabilities:
            return super().logits(images)
        l = self.logit(images)  # noqa: E741 - the papers' l
        return torch.stack([-l / 2, l / 2], dim=1)  # symmetric: each class's own logit has a gradient (Grad-CAM)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            p = torch.sigmoid(self.logit(images).detach().float().cpu())
        return check_probabilities(torch.stack([1 - p, p], dim=1), images.shape[0], 2, self.spec)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict:
        info = {**self.inner.describe(), "spec": self.spec, "labels": list(self.labels)}
        # run.json: which output was explained; ``names`` lets ``cfx eval`` resolve #attribute=NAME as explain did
        info["output"] = {"index": self.index, "attribute": self.attribute, "names": self.outputs}
        return info


def _columns(out):
    """(N,) → (N, 1): the authors' wrappers return the explained logit alone (DiME's ``ClassificationModel``)."""
    return out[:, None] if getattr(out, "ndim", None) == 1 else out


def _unnamed(labels: Sequence[str], width: int) -> bool:
    """Labels an adapter made up for lack of names (``0``…``M-1``, or of another width than the outputs)."""
    return len(labels) != width or list(labels) == [str(i) for i in range(width)]


def _attribute_index(attribute: str, names: Sequence[str] | None, width: int, spec: str) -> int:
    if attribute.lstrip("-").isdigit():
        idx = int(attribute)
        if not 0 <= idx < width:
            raise UsageError(f"classifier {spec}: #attribute={idx} is out of range: the model has {width} outputs "
                             f"(0–{width - 1})")
        return idx
    if not attribute:
        raise UsageError(f"classifier {spec}: #attribute needs an output index or name")
    if names is None:
        raise UsageError(f"classifier {spec}: #attribute={attribute}: the model does not name its {width} outputs; "
                         f"give an index or --labels FILE with {width} names")
    idx = find_name(attribute, names)
    if idx is not None:
        return idx
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UsageError(f"classifier {spec}: unknown attribute {attribute!r} (the model's outputs: {shown})")


def read_labels_file(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        labels = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"--labels {p}: cannot read ({exc.strerror or exc})") from None
    if not labels:
        raise UsageError(f"--labels {p}: no labels in file (expected one per line)")
    if len(set(labels)) != len(labels):
        raise UsageError(f"--labels {p}: duplicate label names")
    return labels


def find_name(name: str, names: Sequence[str]) -> int | None:
    """The index of ``name`` in ``names``: an exact match, else the one case-insensitive match; None if neither."""
    if name in names:
        return list(names).index(name)
    lowered = [x.lower() for x in names]
    return lowered.index(name.lower()) if lowered.count(name.lower()) == 1 else None


def resolve_label(label: str, labels: Sequence[str], spec: str = "") -> int:
    found = find_name(label, labels)
    if found is not None:
        return found
    if label.lstrip("-").isdigit():
        idx = int(label)
        if 0 <= idx < len(labels):
            return idx
        raise UsageError(f"target index {idx} is out of range: classifier {spec} has {len(labels)} classes")
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    raise UsageError(f"unknown target {label!r} for classifier {spec} (classes: {shown})")


def check_probabilities(probs: torch.Tensor, n_images: int, n_labels: int | None, source: str) -> torch.Tensor:
    """Validate a (N, K) probability matrix: shape, finite, in [0, 1], rows summing to ≈ 1."""
    import torch

    if probs.ndim != 2 or probs.shape[0] != n_images:
        raise ClassifierError(
            f"{source}: expected probabilities of shape ({n_images}, K), got {tuple(probs.shape)}"
        )
    if n_labels is not None and probs.shape[1] != n_labels:
        raise ClassifierError(f"{source}: expected {n_labels} probabilities per image, got {probs.shape[1]}")
    if not torch.isfinite(probs).all():
        raise ClassifierError(f"{source}: probabilities contain NaN or infinity")
    if (probs < -1e-6).any() or (probs > 1 + 1e-6).any():
        raise ClassifierError(f"{source}: probabilities outside [0, 1] (logits? use the adapter's logits option)")
    sums = probs.sum(dim=1)
    worst = float((sums - 1).abs().max()) if len(sums) else 0.0
    if worst > 1e-3 or math.isnan(worst):
        raise ClassifierError(f"{source}: probability rows must sum to 1 (off by up to {worst:.3g})")
    return probs.float()


def target_score(logits: torch.Tensor, targets: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """(N,) the per-image score of the target class that a white-box method raises (its class loss is −Σ score).

    ``kind="logits"``: z_{y'}, except for K = 2, where it is the logit difference z_{y'} − z_{1−y'}. A single-logit
    binary model l (the published CelebA/BDD classifiers) wrapped as (0, l), (−l/2, l/2) or any other pair with
    difference l then scores ±l — the authors' ∓logit loss (DiME ``use_logits``) whatever the wrapper, where
    −z_{y'} alone would halve λ_c or give no gradient at all. ``kind="log_softmax"``: log p(y'); for K = 2 it is
    log σ(±l), a function of the difference only (the authors' BCE/CE on one logit)."""
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    targets = targets.to(logits.device)
    if kind == "log_softmax":
        return torch.log_softmax(logits, dim=1)[rows, targets]
    if kind != "logits":
        raise ValueError(f"target_score: unknown kind {kind!r} (logits, log_softmax)")
    picked = logits[rows, targets]
    if logits.shape[1] == 2:
        return picked - logits[rows, 1 - targets]
    return picked
