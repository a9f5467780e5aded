"""The functions of ``import cfx``: each builds what the CLI command would and calls the same code
(:mod:`cfx_cli.explain`, :mod:`cfx_cli.evaluate`, :mod:`cfx_cli.classify`, the plugin registry).

The pipeline modules import numpy, PIL and (when run) torch, so they are imported inside the functions:
``import cfx`` stays light.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cfx._inputs import TorchClassifier, borrowed, classifier_spec, input_paths
from cfx.results import Results
from cfx_cli.classify import classify_inputs
from cfx_cli.demo import IMAGES_DIR
from cfx_cli.devices import resolve_device
from cfx_cli.explainers import RunOptions
from cfx_cli.plugins import get_explainer_class, get_registry

#: what ``images`` may be: a path or folder, a PIL image, a (N, 3, H, W) / (3, H, W) tensor in [0, 1], or a
#: sequence of paths, PIL images and (3, H, W) tensors
Images = Any
#: a classifier spec (``demo:digits``, ``hf:ID``, ``onnx:PATH``, ...), a ``torch.nn.Module`` or a TorchClassifier
ClassifierLike = str | TorchClassifier | Any


def explain(
    images: Images,
    method: str,
    *,
    target: str | int = "auto",
    classifier: ClassifierLike = None,
    model: str | None = None,
    params: Mapping[str, Any] | None = None,
    region: str | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 8,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    labels: Sequence[str] | str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "auto",
    precision: str = "fp32",
    model_flags: str | None = None,
    trust_pickle: bool = False,
    progress: TextIO | None = None,
) -> Results:
    """Explain images with a counterfactual method, exactly as ``cfx explain`` does.

    The request goes through the CLI's own code (``cfx_cli.explain``): the same presets and automatic presets
    (e.g. PGD's ``digits`` preset for ``demo:digits``; a note on stderr says so), default regions, backends,
    per-image seeds and ``--resume``; a run made here and one made by ``cfx explain`` with the same inputs and
    options have byte-identical counterfactual PNGs.

    Args:
        images: image files or folders (searched recursively, as the CLI does), PIL images, a (N, 3, H, W) tensor
            in [0, 1], or a list mixing paths, PIL images and (3, H, W) tensors. In-memory images are saved as
            8-bit PNGs in a temporary folder and explained from there (the records' ``source`` names that file;
            the run's ``originals/`` keep the images).
        method: the explainer (``cfx.methods()``), e.g. ``"dime"``, ``"pgd"``, ``"time"``.
        target: the target class name or index, or ``"auto"`` (the most probable class other than the
            predicted one), as ``--target``.
        classifier: a spec string (``--classifier``; default ``demo:digits``), a ``torch.nn.Module`` returning
            logits (white-box; its ``labels``/``input_size`` attributes are read when present) or a
            :class:`cfx.TorchClassifier` (a module with labels, input size and a preprocessing function).
        model: the generative model spec, as ``--model`` (``demo:NAME``, ``diffusers:PATH``, ``adm:PATH.pt``...);
            default: the method's own.
        params: the method's hyperparameters, as ``--set KEY=VALUE``: ``{"preset": "demo", "steps": 20}``;
            ``region_*`` keys are the region source's options. Values may be Python values or strings.
        region: the region the method may change, as ``--region``: ``"auto"``, a mask file or folder, or
            ``SCHEME:ARG`` (``cam:LAYER``, ``clipseg:PROMPT``...). Default: the method's own (RCSB: auto).
        out: the run directory to write (``--out``). None: a temporary one, removed when the returned
            :class:`Results` is garbage-collected (it stays readable, e.g. by :func:`evaluate`, until then).
        seed: the run seed (``--seed``); each image's seed is derived from it and the image id.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: images per batch (``--batch-size``).
        limit: explain at most this many inputs (``--limit``).
        ids: names for the in-memory images (their file names, hence the manifest ids and per-image seeds);
            default: the file a PIL image was opened from, else ``image-000``, ``image-001``...
        labels: class names (a list, or a file with one per line, as ``--labels``).
        resume: continue an interrupted run in ``out`` (``--resume``).
        overwrite: replace an existing run in ``out`` (``--overwrite``).
        backend: where forward-only diffusion-network calls run (``--backend``: auto, torch, onnx, tensorrt).
        precision: ``--precision`` (fp32, fp16, bf16): a copy in that precision for the forward-only calls, and
            ``torch.autocast`` for the calls the method takes gradients through (each gated against fp32).
        model_flags: ADM ``MODEL_FLAGS`` string or flags file (``--model-flags``).
        trust_pickle: allow loading pickled checkpoints (``--trust-pickle``; runs their code).
        progress: the stream for the progress line (default: stderr).

    Returns:
        :class:`Results`: one :class:`Result` per input, in input order, loaded into memory.

    Raises:
        cfx_cli.errors.UsageError: a bad request (unknown method or parameter, missing inputs...), before any
            model is loaded. A bad input image fails its own record (``status == "error"``), not the call.
    """
    # lazy although light: cli_support imports typer and click, which `import cfx` does not need
    from cfx_cli.cli_support import check_backend, check_precision
    from cfx_cli.explain.pipeline import run_explain  # numpy, PIL: only when called

    spec, module_clf = classifier_spec(classifier)
    tmp = Path(tempfile.mkdtemp(prefix="cfx-"))
    try:
        run_dir = Path(out) if out is not None else tmp / "run"
        inputs = input_paths(images, tmp / "inputs", ids)
        req = _request(inputs, method, target, spec, run_dir, batch_size, seed, device, params, limit, resume,
                       overwrite, model, model_flags, labels, tmp, trust_pickle, region,
                       RunOptions(backend=check_backend(backend), backend_precision=check_precision(precision)))
        with borrowed(module_clf):
            run_explain(req, progress)
        results = Results.load(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # the run lives as long as the results (and is removed at exit at the latest)
        weakref.finalize(results, shutil.rmtree, tmp, ignore_errors=True)
    if module_clf is not None:
        results._keep.append(module_clf)  # so that cfx.evaluate can load it again from run.json's spec
    return results


def _request(inputs, method, target, spec, run_dir, batch_size, seed, device, params, limit, resume, overwrite,
             model, model_flags, labels, tmp: Path, trust_pickle, region, options: RunOptions):
    from cfx_cli.explain.request import ExplainRequest

    return ExplainRequest(
        inputs=inputs, method=method, target=str(target), classifier=spec, out=str(run_dir),
        batch_size=int(batch_size), seed=int(seed), device=device, set_options=dict(params or {}), limit=limit,
        resume=resume, overwrite=overwrite, model=model, model_flags=model_flags,
        labels_file=_labels_file(labels, tmp), trust_pickle=trust_pickle, mask=region, options=options,
    )


def _labels_file(labels: Sequence[str] | str | Path | None, tmp: Path) -> str | None:
    if labels is None or isinstance(labels, str | Path):
        return None if labels is None else str(labels)
    path = tmp / "labels.txt"
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return str(path)


def demo_images(n: int | None = None) -> list[Path]:
    """The bundled demo digits (16×16 PNGs, one or two per class; what ``demo:digits`` classifies), sorted.

    Args:
        n: return only the first ``n``.
    """
    files = sorted(p for p in IMAGES_DIR.iterdir() if p.suffix == ".png")
    return files if n is None else files[:n]


def load(run_dir: str | Path) -> Results:
    """Read a run directory (written by ``cfx explain`` or :func:`explain`) into :class:`Results`.

    Args:
        run_dir: the run directory (it holds ``manifest.jsonl`` and ``run.json``).
    """
    return Results.load(run_dir)


def evaluate(
    run_or_results: Results | str | Path | Sequence[Results | str | Path],
    metrics: str | Sequence[str] | None = None,
    *,
    device: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Compute metrics of one or more runs, as ``cfx eval`` does (and, like it, save each run's ``eval.json``
    and refresh its ``report.html``).

    Args:
        run_or_results: :class:`Results`, a run directory, or a list of them (one table row each).
        metrics: metric names (a list or a comma-separated string), ``"all"``, or None for the default set
            (``cfx metrics`` lists them).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for the metrics that run networks.
        options: metric options, as ``cfx eval --set KEY=VALUE`` (e.g. ``{"inception_weights": PATH}``).

    Returns:
        One dict per run, ``{"run": NAME, "path": RUN_DIR, "n": ..., "flipped": ..., METRIC: VALUE, ...}``.
        A metric that cannot run on a run is left out of its row, with a warning saying why.
    """
    from cfx_cli.evaluate import evaluate as evaluate_runs  # numpy: only when called
    from cfx_cli.evaluate import save_eval_json
    from cfx_cli.report import REPORT_NAME, write_run_report

    items = [run_or_results] if isinstance(run_or_results, Results | str | Path) else list(run_or_results)
    dirs = [str(x.run_dir if isinstance(x, Results) else x) for x in items]
    names = metrics if metrics is None or isinstance(metrics, str) else ",".join(metrics)
    result = evaluate_runs(dirs, names, device=resolve_device(device), options=dict(options or {}))
    for line in result.unfinished.values():
        warnings.warn(line, stacklevel=2)
    saved, problems = save_eval_json(result, names)
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    for run_dir in saved:
        if (run_dir / REPORT_NAME).is_file():
            write_run_report(run_dir)
    for run, reasons in result.skipped.items():
        for metric, reason in reasons.items():
            warnings.warn(f"skipped {metric} for {run}: {reason}", stacklevel=2)
    return [{"run": name, "path": result.paths.get(name), **result.rows[name]} for name in result.runs]


def classify(
    images: Images,
    classifier: ClassifierLike = None,
    *,
    labels: Sequence[str] | str | Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    ids: Sequence[str] | None = None,
    trust_pickle: bool = False,
) -> list[dict[str, Any]]:
    """Labels and probabilities of images, as ``cfx classify`` computes them.

    Args:
        images: as for :func:`explain` (paths, folders, PIL images, tensors).
        classifier: as for :func:`explain` (spec string, ``torch.nn.Module`` or :class:`TorchClassifier`).
        labels: class names (a list, or a file with one per line).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: images per classifier call.
        ids: names for in-memory images (as for :func:`explain`).
        trust_pickle: allow loading pickled checkpoints.

    Returns:
        One dict per input, in input order: ``id``, ``source`` (for an in-memory image, the temporary file it was
        written to), ``label`` and ``probabilities`` (label → p), or ``error`` (with ``label`` None) for an input
        that could not be read or classified.
    """
    spec, module_clf = classifier_spec(classifier)
    with tempfile.TemporaryDirectory(prefix="cfx-") as tmp:
        inputs = input_paths(images, Path(tmp) / "inputs", ids)
        with borrowed(module_clf):
            results, _ = classify_inputs(inputs, spec, _labels_file(labels, Path(tmp)), device, batch_size,
                                         trust_pickle)
    return results


@dataclass(frozen=True)
class ParamInfo:
    """One hyperparameter of a method (``params={name: value}`` / ``--set name=value``)."""

    name: str
    kind: str  # int, float, bool, str or floats
    default: Any
    bounds: str  # e.g. ">= 1", "in [0, 1]"; "" when unbounded
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class MethodInfo:
    """An installed counterfactual method: what ``cfx methods NAME`` shows."""

    name: str
    summary: str
    description: str
    white_box: bool  # needs classifier gradients
    params: tuple[ParamInfo, ...]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugin: str = ""

    def __repr__(self) -> str:
        kind = "white-box" if self.white_box else "black-box"
        return f"MethodInfo({self.name!r}, {kind}, {len(self.params)} params, presets {sorted(self.presets)})"


def method(name: str) -> MethodInfo:
    """One installed method's description, parameters and presets.

    Args:
        name: the method name, e.g. ``"dime"``.

    Raises:
        cfx_cli.errors.UsageError: no such method (the message lists the installed ones).
    """
    cls = get_explainer_class(name)
    plugin = get_registry().explainers.get(name, (None, ""))[1]
    params = tuple(ParamInfo(p.name, p.kind, p.default, p.bounds(), p.help, p.choices) for p in cls.params)
    return MethodInfo(name, cls.summary, cls.description.strip(), "gradients" in cls.requires, params,
                      {k: dict(v) for k, v in cls.presets.items()}, str(plugin))


def methods() -> list[MethodInfo]:
    """Every installed method (built-in and plugins), sorted by name, as ``cfx methods`` lists them."""
    return [method(name) for name in sorted(get_registry().explainers)]


