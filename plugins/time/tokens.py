"""Learnable token embeddings and TIME's token artifact (``cfx fit time`` writes it, ``--tokens`` reads it).

The new tokens are added to the tokenizer and looked up by a wrapper around the text encoder's embedding
table: only their vectors are parameters, so only they train (the frozen vocabulary is never touched).
The artifact is ``NAME.safetensors`` (one (D,) vector per token) plus ``NAME.json`` beside it (token names,
class labels, the classifier it was fitted for, the base model, the prompts and the training settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfx_cli.errors import UsageError

FORMAT = "cfx-time-tokens"
VERSION = 1


def context_token_names(n: int) -> list[str]:
    return [f"<time-ctx-{k}>" for k in range(n)]


def class_token_names(class_index: int, n: int) -> list[str]:
    return [f"<time-c{class_index}-{k}>" for k in range(n)]


def install_tokens(model, names: list[str], init):
    """Add ``names`` to the model's tokenizer and embedding lookup; returns the (len(names), D) Parameter.

    ``init`` is a (len(names), D) tensor of starting vectors. Re-installing names already present reuses
    their slots (and resets them to ``init``).
    """
    emb = _extended_embedding(model)
    tok = model.tokenizer
    new = [n for n in names if n not in tok.get_vocab()]
    if new:
        tok.add_tokens(new)
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    base_rows = emb.base.weight.shape[0]
    for n, i in zip(names, ids, strict=True):
        if i is None or i < base_rows and n not in emb.slot_of:
            raise UsageError(f"cannot add token {n!r} to the tokenizer (it maps to existing id {i})")
    rows = []
    for n, i in zip(names, ids, strict=True):
        if n not in emb.slot_of:
            emb.slot_of[n] = (i, len(emb.slot_of))
        rows.append(emb.slot_of[n][1])
    emb.rebuild(init.new_zeros((len(emb.slot_of), init.shape[1])))
    with torch.no_grad():
        emb.vectors[torch.tensor(rows)] = init.to(emb.vectors)
    return emb.vectors


def token_vectors(model, names: list[str]):
    """The current (len(names), D) vectors of installed tokens (a view for reading)."""
    emb = _extended_embedding(model)
    return emb.vectors[[emb.slot_of[n][1] for n in names]]


def token_rows(model, names: list[str]) -> list[int]:
    emb = _extended_embedding(model)
    return [emb.slot_of[n][1] for n in names]


def word_embedding(model, word: str):
    """The embedding of ``word`` when it is one known token, else the mean of the vocabulary (say why)."""
    tok = model.tokenizer
    base = _extended_embedding(model).base.weight
    ids = tok(word, add_special_tokens=False).input_ids if word else []
    unk = getattr(tok, "unk_token_id", None)
    if len(ids) == 1 and ids[0] != unk and ids[0] < base.shape[0]:
        return base[ids[0]].detach().clone(), None
    return base.detach().mean(0).clone(), (f"initialiser word {word!r} is not a single known token; "
                                           "starting from the mean vocabulary embedding")


def _extended_embedding(model) -> ExtendedEmbedding:
    current = model.text_encoder.get_input_embeddings()
    if isinstance(current, ExtendedEmbedding):
        return current
    ext = ExtendedEmbedding(current).to(model.device)
    model.text_encoder.set_input_embeddings(ext)
    return ext


class ExtendedEmbedding(nn.Module):
    """The frozen vocabulary table plus a small Parameter holding the added tokens' vectors."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.slot_of: dict[str, tuple[int, int]] = {}  # token name → (token id, row in ``vectors``)
        self.vectors = nn.Parameter(torch.zeros(0, base.weight.shape[1]))
        self.register_buffer("lookup", torch.full((base.weight.shape[0],), -1, dtype=torch.long),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # for callers that read the vocabulary table (sizes, dtype)
        return self.base.weight

    def rebuild(self, zeros: torch.Tensor) -> None:
        old = self.vectors.detach()
        vec = zeros.to(self.base.weight)
        vec[: old.shape[0]] = old
        self.vectors = nn.Parameter(vec)
        size = max([self.base.weight.shape[0]] + [i + 1 for i, _ in self.slot_of.values()])
        lookup = torch.full((size,), -1, dtype=torch.long, device=self.base.weight.device)
        for i, row in self.slot_of.values():
            lookup[i] = row
        self.lookup = lookup

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self.lookup[ids]
        base = self.base(ids.clamp(max=self.base.weight.shape[0] - 1))
        new = self.vectors[slots.clamp(min=0)]
        return torch.where((slots >= 0)[..., None], new, base)


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
        raise UsageError(f"--tokens {js}: unsupported version {meta.get('version')!r} (this cfx reads {VERSION})")
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
                         f"{classifier_spec} has {list(labels)}; fit tokens for this classifier with `cfx fit time`")
    if meta.get("base_model") != model_id:
        raise UsageError(f"--tokens {where}: fitted on model {meta.get('base_model')!r} but --model is "
                         f"{model_id!r}; tokens only work with the model they were learned on")
    if int(meta.get("embedding_dim", -1)) != embedding_dim:
        raise UsageError(f"--tokens {where}: token vectors are {meta.get('embedding_dim')}-d but the text encoder "
                         f"of {model_id} uses {embedding_dim}-d embeddings")
    spec = (meta.get("classifier") or {}).get("spec")
    if spec != classifier_spec:
        # the same model may be reached another way (demo:digits in-process vs. `cfx serve` over http)
        notes.append(f"tokens were fitted with classifier {spec}; using them with {classifier_spec} "
                     "(same class labels)")
    return notes
