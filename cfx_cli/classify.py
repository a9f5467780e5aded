"""``cfx classify``: labels and probabilities for a set of images."""

from __future__ import annotations

import os
from pathlib import Path

from cfx_cli.classifiers import (
    DEFAULT_SPEC,
    ClassifierOptions,
    load_classifier,
    predict_partly,
    read_labels_file,
)
from cfx_cli.devices import resolve_device
from cfx_cli.errors import CfxError, InputError


def classify_inputs(inputs, spec, labels_file, device, batch_size, trust_pickle):
    import numpy as np
    import torch

    from cfx_cli.images import decode, discover, resize

    items = discover(inputs)
    dev = resolve_device(device)
    labels = read_labels_file(labels_file) if labels_file else None
    clf = load_classifier(spec or DEFAULT_SPEC, ClassifierOptions(device=dev, labels=labels,
                                                                  trust_pickle=trust_pickle))
    results: list[dict] = []
    failed = False
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            arrays, ok = [], []
            for it in chunk:
                try:
                    arrays.append(resize(decode(it.path), clf.input_size))
                    ok.append(it)
                except InputError as exc:
                    failed = True
                    results.append({"id": it.id, "source": str(it.path), "label": None,
                                    "probabilities": None, "error": str(exc)})
            groups: dict = {}
            for it, arr in zip(ok, arrays, strict=True):
                groups.setdefault(arr.shape, []).append((it, arr))
            for group in groups.values():
                x = torch.from_numpy(np.stack([a for _, a in group])).permute(0, 3, 1, 2).to(dev)
                try:  # a failed (remote) batch fails its inputs, not the command; a partly failed one, some
                    probs, refused = predict_partly(clf, x)
                    probs = probs.cpu()
                except CfxError as exc:
                    probs, refused = None, dict.fromkeys(range(len(group)), str(exc))
                for j, (it, _) in enumerate(group):
                    if j in refused:
                        failed = True
                        results.append({"id": it.id, "source": str(it.path), "label": None,
                                        "probabilities": None, "error": f"classifier failed: {refused[j]}"})
                        continue
                    row = probs[j]
                    results.append({
                        "id": it.id,
                        "source": str(it.path),
                        "label": clf.labels[int(row.argmax())],
                        "probabilities": {lab: round(float(p), 6) for lab, p in zip(clf.labels, row, strict=True)},
                    })
    finally:
        clf.close()
    order = {str(it.path): i for i, it in enumerate(items)}
    results.sort(key=lambda r: order[r["source"]])
    return results, failed


def common_folder(results: list[dict]) -> Path | None:
    """The deepest folder holding every input (None when there are none)."""
    if not results:
        return None
    parents = [Path(r["source"]).resolve().parent for r in results]
    return Path(os.path.commonpath([str(p) for p in parents]))


def shorten_left(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters, so its end (the part a reader needs) stays."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def render_table(results: list[dict], console) -> None:
    """The classify table: each input's path below the common folder in full (wrapped, never cut), the folder
    once above the table, shortened from the left when the terminal is narrow."""
    from rich.table import Table

    folder = common_folder(results)
    table = Table()
    table.add_column("input", overflow="fold")
    table.add_column("label", no_wrap=True)
    table.add_column("p", overflow="fold")
    for r in results:
        name = Path(r["source"]).resolve().relative_to(folder).as_posix() if folder else r["source"]
        if r.get("error"):
            table.add_row(name, "error", r["error"])
        else:
            table.add_row(name, r["label"], f"{r['probabilities'][r['label']]:.3f}")
    if folder is not None:
        console.print(f"in {shorten_left(str(folder), max(20, console.width - 3))}", soft_wrap=True, highlight=False)
    console.print(table)
