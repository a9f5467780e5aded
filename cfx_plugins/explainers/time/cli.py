"""``cfx fit time``: option handling around :func:`fit_time_tokens` (kept out of the core CLI module)."""

from __future__ import annotations

import sys
import time

from cfx_cli.errors import UsageError
from cfx_cli.models import DEFAULT_MODELS, load_model


def run_fit(*, data: str, out: str, classifier: str | None, model: str | None, set_options: list[str],
            seed: int, device: str, labels_file: str | None, trust_pickle: bool, overwrite: bool) -> None:
    from cfx_cli.classifiers import DEFAULT_SPEC, ClassifierOptions, load_classifier, read_labels_file
    from cfx_cli.devices import resolve_device
    from cfx_cli.params import parse_set_options, resolve_params

    from .fit import FIT_AUTO_PRESETS, FIT_PARAMS, FIT_PRESETS, fit_time_tokens
    from .tokens import artifact_paths, save_artifact

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
