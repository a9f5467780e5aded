"""New learnable token embeddings in a CLIP text encoder (textual inversion, as TIME fits them).

``add_tokens`` extends the tokenizer and the embedding table, initialising each new row from a word's
embedding; ``train_only_tokens`` freezes everything else and masks gradients so only the new rows move;
``save_tokens``/``load_tokens`` store the rows as safetensors keyed by token string.
"""

from __future__ import annotations

from pathlib import Path

from cfx_cli.errors import UsageError


def add_tokens(tokenizer, text_encoder, tokens: list[str], init_word: str | None = None, seed: int = 0) -> list[int]:
    """Add ``tokens`` (new strings) and return their ids. Rows start as the mean embedding of ``init_word``'s
    tokens, or as Gaussian noise with the table's std when there is none."""
    import torch

    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise UsageError(f"token(s) {', '.join(clash)} already in the tokenizer's vocabulary; choose new strings")
    if len(set(tokens)) != len(tokens):
        raise UsageError("duplicate token strings")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise UsageError(f"the tokenizer added {added} of {len(tokens)} tokens")
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        if init_word:
            init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
            if not init_ids:
                raise UsageError(f"initialiser word {init_word!r} has no tokens")
            init = table[init_ids].mean(dim=0)
            for i in ids:
                table[i] = init
        else:
            g = torch.Generator().manual_seed(seed)
            std = table[: min(ids)].std().item()
            for i in ids:
                table[i] = (torch.randn(table.shape[1], generator=g) * std).to(table)
    return list(ids)


def train_only_tokens(text_encoder, ids: list[int]):
    """Freeze the text encoder except its input embedding table, and zero the gradient of every row not in
    ``ids`` (a hook), so an optimiser over ``get_input_embeddings().weight`` updates only the new tokens.
    Weight decay would still shrink frozen rows: use it on a copy or restore them (``restore_rows``).
    Returns the embedding weight to optimise and the hook handle."""
    import torch

    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[list(ids)] = 1
    handle = weight.register_hook(lambda grad: grad * keep)
    return weight, handle


def restore_rows(text_encoder, reference, ids: list[int]) -> None:
    """Copy every row except ``ids`` back from ``reference`` (undo weight decay on frozen rows)."""
    import torch

    weight = text_encoder.get_input_embeddings().weight
    mask = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    mask[list(ids)] = False
    with torch.no_grad():
        weight[mask] = reference.to(weight)[mask]


def save_tokens(path: str | Path, tokenizer, text_encoder, tokens: list[str]) -> None:
    from safetensors.torch import save_file

    weight = text_encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    save_file(
        {t: weight[i].detach().float().cpu().contiguous() for t, i in zip(tokens, ids, strict=True)},
        str(path),
        metadata={"format": "cfx-tokens", "tokens": ",".join(tokens)},
    )


def load_tokens(path: str | Path, tokenizer, text_encoder) -> list[str]:
    """Add the tokens stored in ``path`` (safetensors: token → vector) with their learned embeddings."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            order = (f.metadata() or {}).get("tokens", "")
            vectors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise UsageError(f"--tokens {path}: not a readable safetensors file of token embeddings ({exc})") from None
    if order and set(order.split(",")) == set(vectors):
        vectors = {t: vectors[t] for t in order.split(",")}  # the order they were saved in
    width = text_encoder.get_input_embeddings().weight.shape[1]
    bad = [t for t, v in vectors.items() if tuple(v.shape) != (width,)]
    if bad:
        raise UsageError(f"--tokens {path}: token(s) {', '.join(bad)} do not have the text encoder's width {width}")
    tokens = list(vectors)
    ids = add_tokens(tokenizer, text_encoder, tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for t, i in zip(tokens, ids, strict=True):
            weight[i] = vectors[t].to(weight)
    return tokens
