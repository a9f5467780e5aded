"""One worker: the classifier, the explainer and the region source of a run, and the explanation of a batch of
inputs into manifest records. :func:`build_worker` is the only place they are built, for every executor."""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from cfx_cli.classifiers import Classifier, ClassifierOptions, load_classifier, predict_partly
from cfx_cli.devices import is_out_of_memory, resolve_device
from cfx_cli.errors import CfxError, InputError, UsageError
from cfx_cli.explainers import ExplainBatch, ExplainContext, Explainer, ExplainOutput
from cfx_cli.guide import guided_classifier
from cfx_cli.images import InputImage, decode, save_png, to_working_size
from cfx_cli.models.memory import note
from cfx_cli.plugins import black_box_methods
from cfx_cli.runs import Record, RunDir, read_manifest

if TYPE_CHECKING:
    from cfx_cli.explain.request import ExplainPlan
    from cfx_cli.regions import RegionSource


def image_seed(seed: int, ident: str) -> int:
    """Per-image seed from the run seed and the input id: independent of batching and sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{ident}".encode()).digest()[:4], "little")


class BatchWorker:
    """Explains batches of inputs into a run directory; one per process (local) or per Ray actor."""

    def __init__(self, run: RunDir, explainer: Explainer, classifier: Classifier, fixed_target: int | None,
                 plan: ExplainPlan) -> None:
        # ``classifier`` re-classifies the saved outputs; the explainer's own (context.classifier) may be it
        # wrapped in a robust guide (cfx_cli/guide.py)
        self.run, self.explainer, self.classifier = run, explainer, classifier
        self.fixed_target, self.plan = fixed_target, plan
        #: (H, W) every input is brought to before the explainer sees it (its generator's); None = native sizes
        self.size = _working_size(explainer)
        self._closed = False

    @property
    def region(self) -> RegionSource | None:
        return self.plan.region

    def process(self, chunk: list[InputImage], skip_recorded: bool = False) -> list[Record]:
        """Explain one batch. ``skip_recorded`` makes a retried batch idempotent: inputs that a killed
        attempt already recorded are not explained (or recorded) twice."""
        if skip_recorded:
            recorded = {r["id"] for r in read_manifest(self.run.manifest_path)}
            chunk = [it for it in chunk if it.id not in recorded]
            if not chunk:
                return []
        return _process_batch(chunk, self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.explainer.context.classifier is not self.classifier:
                self.explainer.context.classifier.close()
            self.classifier.close()


def build_worker(plan: ExplainPlan, before_explainer: Callable[[Classifier], None] | None = None) -> BatchWorker:
    """Load the classifier, check it against the method and the region, then build the explainer (which loads
    its models). ``before_explainer(classifier)`` runs just before that, for checks that need the classifier."""
    req = plan.req
    device = resolve_device(req.device)
    options = ClassifierOptions(device=device, labels=plan.labels, trust_pickle=req.trust_pickle)
    classifier = load_classifier(plan.spec, options)
    seen = classifier
    try:
        if plan.region is not None:
            plan.region.check(classifier)
        missing = set(plan.explainer_cls.requires) - set(classifier.capabilities)
        if missing:
            bb = ", ".join(black_box_methods()) or "none installed"
            raise UsageError(
                f"method {req.method!r} needs classifier {', '.join(sorted(missing))}, which {plan.spec} does not "
                f"provide (it is a black box); methods that work with black-box classifiers: {bb}"
            )
        fixed_target = None if req.target == "auto" else classifier.label_index(req.target)
        if before_explainer is not None:
            before_explainer(classifier)
        seen = guided_classifier(classifier, plan.params, options, plan.spec)
        context = ExplainContext(classifier=seen, params=plan.params, device=device, model=req.model,
                                 model_flags=req.model_flags, trust_pickle=req.trust_pickle, options=req.options)
        explainer = plan.explainer_cls(context)
    except BaseException:
        if seen is not classifier:
            seen.close()
        classifier.close()
        raise
    return BatchWorker(RunDir(plan.out), explainer, classifier, fixed_target, plan)


def _working_size(explainer: Explainer) -> tuple[int, int] | None:
    size = explainer.working_size()
    if size is None:
        return None
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise RuntimeError(f"{explainer.name}: working_size() returned {size!r}, not a positive (H, W)")
    return h, w


def _error_record(item: InputImage, message: str, seed: int) -> Record:
    return Record(id=item.id, source=str(item.path), status="error", error=message, seed=seed)


def _process_batch(chunk: list[InputImage], worker: BatchWorker) -> list[Record]:
    run, classifier, region = worker.run, worker.classifier, worker.region
    records: list[Record] = []
    good: list[tuple[InputImage, np.ndarray, np.ndarray | None]] = []
    geometry: dict[str, dict] = {}  # id → the manifest's source_size, size and crop
    region_seconds: dict[str, float] = {}  # id → time spent computing its region (part of its explanation)
    for item in chunk:
        seed = image_seed(worker.plan.req.seed, item.id)
        try:
            raw = decode(item.path)
            arr, crop = to_working_size(raw, worker.size)
            t_region = time.monotonic()
            mask = region.mask_for(item, arr.shape[:2], image=arr, classifier=classifier) if region else None
            region_seconds[item.id] = time.monotonic() - t_region
        except InputError as exc:
            rec = _error_record(item, str(exc), seed)
            run.append(rec)
            records.append(rec)
            continue
        geometry[item.id] = {"source_size": list(raw.shape[:2]), "size": list(arr.shape[:2]), "crop": crop}
        good.append((item, arr, mask))
    if not good:
        return records
    # Without a working size (native resolution) inputs may differ in size: explain each size group together.
    groups: dict[tuple[int, int], list] = {}
    for entry in good:
        groups.setdefault(entry[1].shape[:2], []).append(entry)
    for entries in groups.values():
        records.extend(_explain_group(entries, worker, geometry, region_seconds))
    return records


def _explain_group(entries, worker: BatchWorker, geometry: dict[str, dict],
                   region_seconds: dict[str, float]) -> list[Record]:
    """Explain one same-size group; an image's manifest ``seconds`` is its share of the group's time plus the
    time its region took (``region_seconds``, computed before the group)."""
    import torch

    run, explainer, classifier = worker.run, worker.explainer, worker.classifier
    device = explainer.context.device
    method = worker.plan.method
    t0 = time.monotonic()
    seeds = [image_seed(worker.plan.req.seed, item.id) for item, _, _ in entries]
    images = torch.from_numpy(np.stack([a for _, a, _ in entries])).permute(0, 3, 1, 2).contiguous()
    try:
        probs, refused = predict_partly(classifier, images.to(device))
    except CfxError as exc:
        return _fail_all(entries, run, seeds, f"classifier failed: {exc}")
    except Exception as exc:
        return _fail_all(entries, run, seeds, f"classifier failed: {type(exc).__name__}: {exc}")
    records: list[Record] = []
    if refused:  # a remote classifier isolated the inputs its server refuses: only those fail
        for i, message in refused.items():
            records += _fail_all([entries[i]], run, [seeds[i]], f"classifier failed: {message}")
        keep = [i for i in range(len(entries)) if i not in refused]
        if not keep:
            return records
        entries, seeds = [entries[i] for i in keep], [seeds[i] for i in keep]
        images, probs = images[keep], probs[keep]
    probs = probs.cpu()
    labels = classifier.labels
    src = probs.argmax(dim=1)
    if worker.fixed_target is None:  # auto: the most probable class other than the predicted one
        masked = probs.clone()
        masked[torch.arange(len(src)), src] = -1.0
        targets = masked.argmax(dim=1)
    else:
        targets = torch.full_like(src, worker.fixed_target)

    todo = [i for i in range(len(entries)) if int(src[i]) != int(targets[i])]
    base: list[Record] = []
    for i, (item, arr, _mask) in enumerate(entries):
        orig_path = run.image_path("originals", item.id)
        save_png(arr, orig_path)
        base.append(Record(
            id=item.id, source=str(item.path), source_label=labels[int(src[i])],
            source_prob=round(float(probs[i, src[i]]), 6), target_label=labels[int(targets[i])],
            target_prob_before=round(float(probs[i, targets[i]]), 6), original=run.relative(orig_path),
            seed=seeds[i], **geometry[item.id],
        ))
    for i in range(len(entries)):
        if i not in todo:
            rec = replace(base[i], status="skipped", params=None, seconds=0.0, nfe=0)
            run.append(rec)
            records.append(rec)
    if not todo:
        return records

    sel = torch.tensor(todo)
    masks = None
    if any(entries[i][2] is not None for i in todo):
        masks = torch.from_numpy(np.stack([entries[i][2] for i in todo]))[:, None].to(device)
    batch = ExplainBatch(
        ids=[entries[i][0].id for i in todo], images=images[sel].to(device), targets=targets[sel].to(device),
        sources=src[sel].to(device), seeds=[seeds[i] for i in todo], masks=masks,
    )
    try:
        results = explain_fitting(explainer, batch)
        oom = {j: r for j, r in enumerate(results) if isinstance(r, str)}
        if oom:  # single images that did not fit even alone: only they fail
            for j, message in oom.items():
                i = todo[j]
                records += _fail_all([entries[i]], run, [seeds[i]], message)
            keep = [j for j in range(len(todo)) if j not in oom]
            if not keep:
                return records
            todo = [todo[j] for j in keep]
            masks = masks[keep] if masks is not None else None
        outputs = [r for r in results if not isinstance(r, str)]
        cfs = torch.stack([o.counterfactual.detach().float().cpu().clamp(0, 1) for o in outputs])
        cfs = torch.round(cfs * 255.0) / 255.0  # classify exactly what the saved PNG holds
        after, refused = predict_partly(classifier, cfs.to(device))
        after = after.cpu()
    except CfxError as exc:
        return records + _fail_all([entries[i] for i in todo], run, [seeds[i] for i in todo], str(exc))
    except Exception as exc:
        if explainer.context.options.debug:
            raise
        msg = f"{method} failed: {type(exc).__name__}: {exc}"
        return records + _fail_all([entries[i] for i in todo], run, [seeds[i] for i in todo], msg)
    per_image = (time.monotonic() - t0) / len(todo)
    for j, i in enumerate(todo):
        item = entries[i][0]
        out = outputs[j]
        if j in refused:  # its counterfactual could not be classified
            records += _fail_all([entries[i]], run, [seeds[i]], f"classifier failed: {refused[j]}")
            continue
        cf_path = run.image_path("counterfactuals", item.id)
        save_png(cfs[j].permute(1, 2, 0).numpy(), cf_path)
        mask_rel = None
        mask = out.mask if out.mask is not None else (masks[j] if masks is not None else None)
        if mask is not None:
            mask_path = run.image_path("masks", item.id)
            save_png(mask.detach().float().cpu()[0].numpy(), mask_path)
            mask_rel = run.relative(mask_path)
        for folder, img in out.extras.items():
            save_png(img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(),
                     run.image_path(folder, item.id))
        tgt = int(targets[i])
        cf_label = int(after[j].argmax())
        rec = replace(
            base[i],
            status="flipped" if cf_label == tgt else "not_flipped",
            target_prob_after=round(float(after[j, tgt]), 6),
            cf_label=labels[cf_label],
            counterfactual=run.relative(cf_path),
            mask=mask_rel,
            params=out.params,
            seconds=round(per_image + region_seconds.get(item.id, 0.0), 4),
            nfe=int(out.nfe),
        )
        run.append(rec)
        records.append(rec)
    return records


def _free_memory() -> None:
    import torch

    gc.collect()  # the failed attempt's activations are unreachable once its frames are gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rows(batch: ExplainBatch, lo: int, hi: int) -> ExplainBatch:
    return ExplainBatch(ids=batch.ids[lo:hi], images=batch.images[lo:hi], targets=batch.targets[lo:hi],
                        sources=batch.sources[lo:hi], seeds=batch.seeds[lo:hi],
                        masks=None if batch.masks is None else batch.masks[lo:hi])


def explain_fitting(explainer: Explainer, batch: ExplainBatch) -> list[ExplainOutput | str]:
    """``explainer.explain(batch)``, split in halves and retried on out-of-memory down to single images; an image
    that does not fit alone gets its error message instead of an output. Each image's noise is seeded by its own
    seed (``context.noise``), so the split does not change any result."""
    n = len(batch.ids)
    outputs = None
    try:
        outputs = explainer.explain(batch)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    if outputs is None:  # retried outside the except block: its traceback holds the failed attempt's tensors
        _free_memory()
        if n == 1:
            method = explainer.name
            return [f"{method} failed: out of GPU memory at batch size 1: try a smaller --set (fewer steps or "
                    f"samples) or --precision fp16"]
        half = (n + 1) // 2
        sizes = f"{half}" if half == n - half else f"{half} and {n - half}"
        note(f"out of GPU memory on a batch of {n}; retrying as 2 batches of {sizes}")
        return explain_fitting(explainer, _rows(batch, 0, half)) + explain_fitting(explainer, _rows(batch, half, n))
    if len(outputs) != n:
        raise RuntimeError(f"explainer returned {len(outputs)} outputs for {n} images")
    return list(outputs)


def _fail_all(entries, run: RunDir, seeds: list[int], message: str) -> list[Record]:
    records = []
    for (item, _, _), seed in zip(entries, seeds, strict=True):
        rec = _error_record(item, message if str(item.path) in message else f"{item.path}: {message}", seed)
        run.append(rec)
        records.append(rec)
    return records
