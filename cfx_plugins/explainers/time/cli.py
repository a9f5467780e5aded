"""``cfx fit time``: the command (added through the ``register_commands`` hook) and its option handling around
:func:`fit_time_tokens`."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from cfx_cli.classifiers import DEFAULT_SPEC, ClassifierOptions, load_classifier, read_labels_file
from cfx_cli.devices import resolve_device
from cfx_cli.errors import UsageError
from cfx_cli.models import DEFAULT_MODELS, load_model
from cfx_cli.params import parse_set_options, resolve_params

from .fit import FIT_AUTO_PRESETS, FIT_PARAMS, FIT_PRESETS, fit_time_tokens
from .tokens import artifact_paths, save_artifact


def fit_time(
    data: Annotated[str, typer.Option("--data", help="Folder of training images (searched recursively).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Token file to write: FILE.safetensors + FILE.json.")],
    classifier: Annotated[str | None, typer.Option(
        "--classifier", "-c", help="Classifier spec (default: demo:digits); only its predictions are used.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="diffusers:SD_FOLDER_OR_ID or demo:NAME (default demo:latent, the embedded digits model).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Training setting KEY=VALUE, or preset=thesis|code|digits (see docs/methods/time.md).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    labels: Annotated[str | None, typer.Option("--labels", help="Class names, one per line.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing token file.")] = False,
) -> None:
    """TIME: learn context and per-class tokens from the classifier's predictions (textual inversion)."""
    run_fit(data=data, out=out, classifier=classifier, model=model, set_options=set_ or [], seed=seed,
            device=device, labels_file=labels, trust_pickle=trust_pickle, overwrite=overwrite)


def run_fit(*, data: str, out: str, classifier: str | None, model: str | None, set_options: list[str],
            seed: int, device: str, labels_file: str | None, trust_pickle: bool, overwrite: bool) -> None:
    spec = classifier or DEFAULT_SPEC
    model = model or DEFAULT_MODELS["latent"]
    overrides = parse_set_options(set_options)
    if "preset" not in overrides:
        overrides["preset"] = FIT_AUTO_PRESETS.get(model, "thesis")
        print(f"note: using fit preset {overrides['preset']!r} (override with --set preset=NAME)",
              file=sys.stderr)
    params = resolve_params("fit time", FIT_PARAMS, FIT_PRESETS, overrides)
    st, js = artifact_paths(out)
    if not overwrite and (st.exists() or js.exists()):
        raise UsageError(f"--out {out}: {st if st.exists() else js} exists (use --overwrite to replace it)")
    dev = resolve_device(device)
    labels = read_labels_file(labels_file) if labels_file else None
    clf = load_classifier(spec, ClassifierOptions(device=dev, labels=labels, trust_pickle=trust_pickle))
    t0 = time.monotonic()
    try:
        m = load_model(model, device=dev, expect="latent", method="cfx fit time")
        result = fit_time_tokens(data, clf, m, params, seed=seed)
    finally:
        clf.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    st, js = save_artifact(out, result.vectors, result.meta)
    losses = result.meta["training"]["final_loss"]
    print(f"wrote {st} and {js}: {len(result.meta['tokens']['classes'])} classes, final loss context "
          f"{losses['context']:.4f} ({time.monotonic() - t0:.0f}s)")
