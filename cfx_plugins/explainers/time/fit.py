"""``cfx fit time``: distil a classifier into text tokens (thesis §5.3.2).

1. Query the classifier on every training image (black-box: probabilities only) → predicted class.
2. Context tokens (3): textual inversion on all images with the prompt "a <ctx> picture".
3. Class tokens (3 per predicted class): textual inversion on the images predicted as that class with the
   prompt "a <ctx> picture with a <class>", the context tokens frozen.

Loss (eq. 5.5): ‖ε − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, C)‖² with t uniform over the training steps and z a sample
of the VAE posterior. Only the new embeddings are parameters (AdamW). All classes train in the same loop with
``batch_size`` images each per iteration: the class tokens never meet in one prompt and Adam is element-wise,
so this equals training each class on its own for ``iterations`` steps, in one pass over the network.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfx_cli.errors import InputError, UsageError
from cfx_cli.models.tokens import restore_rows, train_only_tokens
from cfx_cli.params import Param
from cfx_cli.progress import Progress

from . import tokens as T

FIT_PARAMS = (
    Param("iterations", "int", 800, "optimisation steps per token set (context, then the classes)", min=1),
    Param("lr", "float", 0.01, "AdamW learning rate", min=0.0),
    Param("weight_decay", "float", 1e-4, "AdamW weight decay", min=0.0),
    Param("batch_size", "int", 64, "images per iteration (per class in the class stage)", min=1),
    Param("micro_batch", "int", 8, "images per forward/backward pass (gradient accumulation above this)", min=1),
    Param("num_tokens", "int", 3, "tokens for the context and for each class", min=1),
    Param("context_init", "str", "picture", "word initialising the context tokens, or one word per token "
          "('' = noise)"),
    Param("class_init", "str", "picture", "the same for the class tokens; per class in label order: "
          "WORDS|WORDS|..."),
    Param("context_prompt", "str", "a {context} picture", "prompt of the context stage ({picture}: a random "
          "synonym of 'picture' per image, as the authors' code)"),
    Param("class_prompt", "str", "a {context} picture with a {class}", "prompt of the class stage"),
    Param("classify_batch", "int", 32, "images per classifier query (and per VAE encoding pass)", min=1),
)
FIT_PRESETS: dict[str, dict[str, Any]] = {
    # thesis §5.4: 800 iterations, lr 0.01, weight decay 1e-4, batch 64
    "thesis": {"iterations": 800, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 64},
    # the authors' code: 3000 iterations at lr 1e-4 (batch and decay as in the thesis)
    "code": {"iterations": 3000, "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 64},
    # the 16×16 demo (DEMO-FEASIBILITY.md: tokens from "digit", lr 5e-3). Its text encoder reads 8 tokens, so
    # 2 tokens per set in prompts shaped like its training captions ("a handwritten digit three"); fewer,
    # smaller steps so that fitting takes minutes on two CPU cores
    "digits": {"iterations": 200, "lr": 5e-3, "batch_size": 16, "micro_batch": 64, "num_tokens": 2,
               "context_init": "digit",
               "class_init": "digit", "context_prompt": "a {context} digit",
               "class_prompt": "a {context} digit {class}"},
    # the authors' README (CelebA-HQ smile, label 31): the code's training settings, initialisation words
    # and prompts (core/phrases.py); classes in label order 0 = not smiling, 1 = smiling
    "published": {"iterations": 3000, "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 64, "num_tokens": 3,
                  "context_init": "centered realistic celebrity",
                  "class_init": "serious serious serious|smile smile smile",
                  "context_prompt": "A {context} {picture}", "class_prompt": "A {context} photo with a {class}"},
}
#: the synonyms the authors' context phrases draw from (core/phrases.py), one per image
PICTURE_SYNONYMS = ("portrait", "picture", "image", "photo", "photograph", "snapshot")
#: preset chosen for a --model spec when the user names none (the demo model needs short prompts)
FIT_AUTO_PRESETS = {"demo:latent": "digits"}


def init_words(text: str, n: int, classes: int | None = None) -> list[list[str]]:
    """Initialiser words per token set: ``text`` is one entry (``classes`` None: the context) or ``|``-separated
    entries, one per class (a single entry serves every class). An entry of exactly ``n`` words gives one
    word per token (the authors' --custom_tokens_init); otherwise the whole entry initialises each token."""
    entries = [e.strip() for e in str(text).split("|")] if classes is not None else [str(text).strip()]
    want = 1 if classes is None else classes
    if len(entries) == 1:
        entries = entries * want
    if len(entries) != want:
        raise UsageError(f"--set class_init={text!r}: {len(entries)} entries for {want} classes "
                         "(give one entry, or one per class separated by |)")
    out = []
    for e in entries:
        words = e.split()
        out.append(words if len(words) == n and n > 1 else [e] * n)
    return out


def prompt_variants(template: str, **fields: str) -> list[str]:
    """The prompts a stage trains with: one, or one per synonym when the template has ``{picture}``."""
    if "{picture}" not in template:
        return [template.format(**fields)]
    return [template.format(picture=w, **fields) for w in PICTURE_SYNONYMS]


def install_set(model, names: list[str], words: list[str]) -> None:
    """Install ``names``, each initialised from its own word ('' = noise)."""
    if len(set(words)) == 1:  # one initialiser: one call (noise rows then differ from each other)
        T.install_tokens(model, names, init_word=words[0])
        return
    for name, word in zip(names, words, strict=True):
        T.install_tokens(model, [name], init_word=word)


@dataclass
class FitResult:
    vectors: dict[str, Any]
    meta: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def scan_training_images(data: str, classifier, model, chunk: int, stream) -> tuple:
    """Classify and encode every image under ``data``, ``chunk`` images at a time (memory stays bounded:
    only predictions and the VAE posterior's mean/std are kept). → (ids, predicted, mean, std, skipped)."""
    import torch

    from cfx_cli.images import decode, discover, to_working_size

    if not Path(data).is_dir():
        raise UsageError(f"--data {data}: not a folder of images")
    items = discover([data])
    if not items:
        raise UsageError(f"--data {data}: no images found (looked for png, jpg, jpeg, bmp, webp)")
    r = model.resolution
    ids, preds, means, stds, skipped = [], [], [], [], []
    with Progress("fit time: classify + encode", len(items), stream=stream) as bar:
        for start in range(0, len(items), chunk):
            batch = []
            for it in items[start: start + chunk]:
                try:
                    arr = decode(it.path)
                except InputError as exc:
                    skipped.append(str(exc))
                    continue
                ids.append(it.id)
                # as in `cfx explain`: at the model's resolution (short-side resize + centre crop), quantised; the
                # classifier applies its own preprocessing to that
                batch.append(torch.from_numpy(to_working_size(arr, (r, r))[0]).permute(2, 0, 1))
            if batch:
                x = torch.stack(batch)
                preds.append(classifier.predict_proba(x.to(model.device)).argmax(1).cpu())
                with torch.no_grad():
                    dist = model.latent_dist(x)
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
            bar.advance(len(items[start: start + chunk]))
    if not ids:
        raise UsageError(f"--data {data}: none of the {len(items)} images could be decoded ({skipped[0]})")
    return ids, torch.cat(preds), torch.cat(means), torch.cat(stds), skipped


def fit_time_tokens(data: str, classifier, model, params: dict[str, Any], *, seed: int = 0,
                    progress_stream=None) -> FitResult:
    import torch

    from cfx_cli.diffusion import q_sample_at

    t_start = time.monotonic()
    stream = progress_stream or sys.stderr
    notes: list[str] = []
    for key, needed in (("context_prompt", ("{context}",)), ("class_prompt", ("{context}", "{class}"))):
        if not all(n in params[key] for n in needed):
            raise UsageError(f"--set {key}={params[key]!r}: must contain {' and '.join(needed)}")
    if "{picture}" in params["class_prompt"]:
        raise UsageError(f"--set class_prompt={params['class_prompt']!r}: {{picture}} is for the context prompt "
                         "only (explanations use the class prompt as it is)")

    ids, predicted, mean, std, skipped = scan_training_images(data, classifier, model, params["classify_batch"],
                                                              stream)
    notes += [f"skipped {s}" for s in skipped]
    labels = list(classifier.labels)
    counts = {labels[k]: int((predicted == k).sum()) for k in range(len(labels))}
    print(f"fit time: {len(ids)} images; classifier predictions: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()), file=stream)

    gen = torch.Generator().manual_seed(seed)
    dev = model.device
    # the VAE posterior (mean, std) was cached by the scan; every step draws a fresh sample from it
    n = params["num_tokens"]
    ctx_names = T.context_token_names(n)
    install_set(model, ctx_names, init_words(params["context_init"], n)[0])
    context = " ".join(ctx_names)
    class_words = init_words(params["class_init"], n, len(labels))

    def stage(title: str, groups: list[tuple[list[int], list[str]]], names: list[str]) -> list[float]:
        """Train the rows of ``names``; groups = (image indices, prompts), one per token set; an image draws
        one of its group's prompts at random when there are several ({picture})."""
        ids = model.tokenizer.convert_tokens_to_ids(list(names))
        te = model.text_encoder
        reference = te.get_input_embeddings().weight.detach().clone()
        weight, handle = train_only_tokens(te, ids)
        opt = torch.optim.AdamW([weight], lr=params["lr"], weight_decay=params["weight_decay"])
        prompt_ids = model.tokenize([p for _, ps in groups for p in ps])
        first = torch.tensor([0] + [len(ps) for _, ps in groups]).cumsum(0)[:-1]
        variants = [len(ps) for _, ps in groups]
        bs, mb = params["batch_size"], params["micro_batch"]
        last = [float("nan")] * len(groups)
        recent: list[float] = []
        try:
            with Progress(title, params["iterations"], stream=stream) as bar:
                for _ in range(params["iterations"]):
                    picks = [torch.tensor(idx)[torch.randint(len(idx), (bs,), generator=gen)]
                             for idx, _ in groups]
                    which = torch.cat([torch.full((bs,), g) for g in range(len(groups))])
                    sel = torch.cat(picks)
                    rows = first[which]
                    if max(variants) > 1:  # no extra draws otherwise: earlier fits stay reproducible
                        rows = rows + torch.cat([torch.randint(v, (bs,), generator=gen) for v in variants])
                    opt.zero_grad(set_to_none=True)
                    total = 0.0
                    per_group = torch.zeros(len(groups))
                    for s in range(0, len(sel), mb):
                        b_sel, b_grp, b_row = sel[s: s + mb], which[s: s + mb], rows[s: s + mb]
                        eps0 = torch.randn(mean[b_sel].shape, generator=gen)
                        z = (mean[b_sel] + std[b_sel] * eps0).to(dev) * model.scaling_factor
                        noise = torch.randn(z.shape, generator=gen).to(dev)
                        t = torch.randint(0, model.num_train_timesteps, (len(b_sel),), generator=gen)
                        zt = q_sample_at(z, model.alphas_cumprod[t].to(dev)[:, None, None, None], noise)
                        text = te(prompt_ids[b_row.to(dev)])[0]
                        pred = model.unet_eps(zt, t.to(dev), text)
                        err = (pred - noise).pow(2).flatten(1).mean(1)
                        # mean over each token set's own images: its gradient is its own ε-MSE
                        (err.sum() / bs).backward()
                        total += float(err.detach().sum())
                        per_group.index_add_(0, b_grp, err.detach().cpu())
                    opt.step()
                    restore_rows(te, reference, ids)  # AdamW's decay touches every row; keep the others
                    last = (per_group / bs).tolist()
                    recent = (recent + [total / len(sel)])[-20:]
                    bar.advance(1, info=f"loss {sum(recent) / len(recent):.4f}")
        finally:
            handle.remove()
            weight.requires_grad_(False)
        return last

    ctx_loss = stage("fit time: context tokens", [(list(range(len(ids))),
                                                   prompt_variants(params["context_prompt"], context=context))],
                     ctx_names)
    class_tokens: dict[str, list[str]] = {}
    groups, names = [], []
    for k, label in enumerate(labels):
        idx = (predicted == k).nonzero().flatten().tolist()
        if not idx:
            notes.append(f"no training image is predicted as {label!r}: no tokens for it (it cannot be a "
                         "source or target)")
            continue
        cn = T.class_token_names(k, n)
        install_set(model, cn, class_words[k])
        class_tokens[label] = cn
        groups.append((idx, prompt_variants(params["class_prompt"], context=context,
                                            **{"class": " ".join(cn)})))
        names += cn
    if not groups:
        raise UsageError(f"--data {data}: the classifier predicted no class at all")
    class_loss = stage(f"fit time: class tokens ({len(groups)} classes)", groups, names)

    all_names = ctx_names + names
    vecs = T.token_vectors(model, all_names)
    vectors = {name: vecs[i] for i, name in enumerate(all_names)}
    meta = {
        "tokens": {"context": ctx_names, "classes": class_tokens},
        "labels": labels,
        "classifier": classifier.describe(),
        "base_model": model.spec,
        "embedding_dim": model.embedding_dim,
        # `cfx explain --tokens` applies the explain preset of the same name (digits) unless the user sets one
        "fit_preset": params.get("preset"),
        "prompts": {"context": params["context_prompt"], "class": params["class_prompt"]},
        "training": {
            "settings": {k: params[k] for k in params},
            "seed": seed,
            "images": len(ids),
            "predicted_counts": counts,
            "final_loss": {"context": round(ctx_loss[0], 6),
                           **{lab: round(v, 6) for lab, v in zip(class_tokens, class_loss, strict=True)}},
            "seconds": round(time.monotonic() - t_start, 1),
            "data": str(data),
        },
    }
    return FitResult(vectors=vectors, meta=meta, notes=notes)


def install_artifact(model, vectors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Put fitted vectors into ``model``'s tokenizer/text encoder (tokens from an artifact or a fresh fit)."""
    import torch

    names = list(meta["tokens"]["context"]) + [n for v in meta["tokens"]["classes"].values() for n in v]
    present = [n for n in names if n in model.tokenizer.get_vocab()]
    if present:  # a fit in this process installed them already: just set the rows
        ids = model.tokenizer.convert_tokens_to_ids(present)
        with torch.no_grad():
            table = model.text_encoder.get_input_embeddings().weight
            table[ids] = torch.stack([vectors[n] for n in present]).to(table)
    rest = [n for n in names if n not in present]
    if rest:
        T.install_tokens(model, rest, vectors=torch.stack([vectors[n] for n in rest]).float())
