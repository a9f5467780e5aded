"""Learnable token embeddings and TIME's token artifact (``cfx fit time`` writes it, ``--tokens`` reads it).

The new tokens are added with ``cfx_cli.models.tokens`` (tokenizer + embedding rows; gradients masked so
only the new rows train).
The artifact is ``NAME.safetensors`` (one (D,) vector per token) plus ``NAME.json`` beside it (token names,
class labels, the classifier it was fitted for, the base model, the prompts and the training settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.models.tokens import add_tokens

FORMAT = "cfx-time-tokens"
VERSION = 1


def context_token_names(n: int) -> list[str]:
    return [f"<time-ctx-{k}>" for k in range(n)]


def class_token_names(class_index: int, n: int) -> list[str]:
    return [f"<time-c{class_index}-{k}>" for k in range(n)]


def install_tokens(model, names: list[str], init_word: str | None = None, vectors=None) -> list[int]:
    """Add ``names`` to the model's tokenizer and embedding table (``cfx_cli.models.tokens``); rows start
    from ``init_word``'s embedding, or take ``vectors`` ((len(names), D)) when given. Returns the ids."""
    import torch

    ids = add_tokens(model.tokenizer, model.text_encoder, list(names), init_word=init_word or None)
    if vectors is not None:
        table = model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[ids] = vectors.to(table)
    return ids


def token_vectors(model, names: list[str]):
    """The current (len(names), D) vectors of installed tokens (detached, on the CPU)."""
    ids = model.tokenizer.convert_tokens_to_ids(list(names))
    return model.text_encoder.get_input_embeddings().weight[ids].detach().float().cpu()


# ---- the artifact ----

def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_artifact(path: str | Path, vectors: dict[str, Any], meta: dict[str, Any]) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    st, js = artifact_paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in vectors.items()}, str(st))
    meta = {"format": FORMAT, "version": VERSION, **meta}
    js.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return st, js


def fit_preset_of(path: str | Path) -> str | None:
    """The `cfx fit time` preset a token file was fitted with (read from its JSON only; None if unknown or
    unreadable — loading it properly reports those problems later)."""
    try:
        meta = json.loads(artifact_paths(path)[1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    # artifacts before `fit_preset` existed have it among the training settings
    return meta.get("fit_preset") or ((meta.get("training") or {}).get("settings") or {}).get("preset")


def artifact_record(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What run.json records about the token files a run used: paths, SHA-256 of both, the fit preset."""
    import hashlib

    st, js = artifact_paths(path)
    return {"file": str(st), "sha256": hashlib.sha256(st.read_bytes()).hexdigest(), "meta": str(js),
            "meta_sha256": hashlib.sha256(js.read_bytes()).hexdigest(), "fit_preset": fit_preset_of(path)}


def load_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """→ (vectors by token name, metadata); one clear error naming the file for anything malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, js = artifact_paths(path)
    for f in (st, js):
        if not f.is_file():
            raise UsageError(f"--tokens {path}: {f} is missing (expected NAME.safetensors and NAME.json "
                             "written by `cfx fit time`)")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokens {js}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"--tokens {js}: not a TIME token file (format is not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise UsageError(f"--tokens {js}: unsupported version {meta.get('version')!r} "
                         f"(this cfx reads {VERSION})")
    try:
        vectors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"--tokens {st}: cannot read safetensors ({exc})") from None
    tokens = meta.get("tokens") or {}
    names = list(tokens.get("context", [])) + [n for v in (tokens.get("classes") or {}).values() for n in v]
    lost = [n for n in names if n not in vectors]
    if not names or lost:
        raise UsageError(f"--tokens {st}: missing vectors for {', '.join(lost) or 'every token'}")
    return vectors, meta


def check_artifact(meta: dict[str, Any], where: str, labels: list[str], classifier_spec: str,
                   model_id: str, embedding_dim: int) -> list[str]:
    """Errors for a mismatched classifier/model; returns notes for harmless differences."""
    notes = []
    if list(meta.get("labels") or []) != list(labels):
        raise UsageError(f"--tokens {where}: fitted for classes {meta.get('labels')} but classifier "
                         f"{classifier_spec} has {list(labels)}; fit tokens for this classifier with "
                         "`cfx fit time`")
    if meta.get("base_model") != model_id:
        raise UsageError(f"--tokens {where}: fitted on model {meta.get('base_model')!r} but --model is "
                         f"{model_id!r}; tokens only work with the model they were learned on")
    if int(meta.get("embedding_dim", -1)) != embedding_dim:
        raise UsageError(f"--tokens {where}: token vectors are {meta.get('embedding_dim')}-d but the text "
                         f"encoder of {model_id} uses {embedding_dim}-d embeddings")
    spec = (meta.get("classifier") or {}).get("spec")
    if spec != classifier_spec:
        # the same model may be reached another way (demo:digits in-process vs. `cfx serve` over http)
        notes.append(f"tokens were fitted with classifier {spec}; using them with {classifier_spec} "
                     "(same class labels)")
    return notes
