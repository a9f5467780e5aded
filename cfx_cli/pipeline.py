"""``cfx explain`` end to end: discover → decode → classify → explain → re-classify → write.

The CLI only parses options into an :class:`ExplainRequest`; everything else happens here so that
other front ends (Ray workers, notebooks) run exactly the same code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cfx_cli.classifiers import predict_partly
from cfx_cli.errors import CfxError, InputError, UsageError
from cfx_cli.images import InputImage


@dataclass
class ExplainRequest:
    inputs: list[str]
    method: str
    target: str = "auto"
    classifier: str | None = None
    out: str | None = None
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    set_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    model: str | None = None
    model_flags: str | None = None
    labels_file: str | None = None
    trust_pickle: bool = False
    mask: str | None = None
    shard: str | None = None  # "i/n": explain every n-th input starting at i
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    workers: int = 2  # Ray actors
    gpus_per_worker: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1  # --seeds N: N explanations per input (RUN_DIR, then RUN_DIR/seeds/K with seed + K)


@dataclass
class ExplainSummary:
    run_dir: Path
    counts: dict[str, int]
    errors: list[str]
    seconds: float

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("error") else 0


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` → (i, n); shards are round-robin over the sorted inputs, so they are deterministic."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def image_seed(seed: int, ident: str) -> int:
    """Per-image seed from the run seed and the input id: independent of batching and sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{ident}".encode()).digest()[:4], "little")


def black_box_methods() -> list[str]:
    from cfx_cli.plugins import get_registry

    return sorted(n for n, (cls, _) in get_registry().explainers.items() if "gradients" not in cls.requires)


def get_explainer_class(method: str) -> type:
    from cfx_cli.plugins import get_registry

    explainers = get_registry().explainers
    if method not in explainers:
        known = ", ".join(sorted(explainers)) or "none"
        raise UsageError(f"unknown method {method!r} (installed: {known})")
    return explainers[method][0]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("cfx", "torch", "numpy", "pillow", "diffusers", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run_explain(req: ExplainRequest, progress_stream=None) -> ExplainSummary:
    """Run an explanation job; raises :class:`UsageError` before any work for bad requests."""
    from cfx_cli.classifiers import DEFAULT_SPEC, ClassifierOptions, load_classifier, read_labels_file
    from cfx_cli.devices import describe_device, resolve_device
    from cfx_cli.explainers import ExplainContext
    from cfx_cli.images import discover
    from cfx_cli.params import resolve_params
    from cfx_cli.regions import make_region_source, split_region_options
    from cfx_cli.runs import RunDir

    t_start = time.monotonic()
    explainer_cls = get_explainer_class(req.method)
    spec = req.classifier or DEFAULT_SPEC
    set_options, region_options = split_region_options(dict(req.set_options))
    notes: list[str] = []
    if "preset" not in set_options and spec in explainer_cls.auto_presets:
        set_options["preset"] = explainer_cls.auto_presets[spec]
        notes.append(f"note: using {req.method} preset {set_options['preset']!r} for classifier {spec} "
                     "(override with --set preset=NAME or individual --set values)")
    params = resolve_params(req.method, explainer_cls.params, explainer_cls.presets, set_options)
    # a method may default to a region source (rcsb: auto) and its presets may carry region options (a, c)
    if not req.mask and getattr(explainer_cls, "default_region", None):
        req = dataclasses.replace(req, mask=explainer_cls.default_region)
        notes.append(f"note: {req.method} uses --region {req.mask} (override with --region FILE|DIR)")
    preset_region = getattr(explainer_cls, "region_presets", {}).get(set_options.get("preset"), {})
    if preset_region and req.mask == "auto":
        region_options = {**preset_region, **region_options}
        req = dataclasses.replace(req, set_options={**preset_region, **dict(req.set_options)})
    if req.executor not in ("local", "ray"):
        raise UsageError(f"--executor {req.executor!r}: expected local or ray")
    if req.executor == "ray":
        from cfx_cli.executors.ray_executor import check_ray_available

        check_ray_available()
        if req.workers < 1:
            raise UsageError(f"--workers {req.workers}: must be at least 1")
    if req.batch_size < 1:
        raise UsageError(f"--batch-size {req.batch_size}: must be at least 1")
    if req.limit is not None and req.limit < 1:
        raise UsageError(f"--limit {req.limit}: must be at least 1")
    items = discover(req.inputs)
    if not items:
        raise UsageError(f"no images found in {', '.join(req.inputs)} (looked for png, jpg, jpeg, bmp, webp)")
    if req.limit is not None:
        items = items[: req.limit]
    shard = parse_shard(req.shard) if req.shard else None
    if shard is not None:
        items = items[shard[0] :: shard[1]]
    if req.model:  # a malformed --model is a usage error before any work (loading happens in the explainer)
        from cfx_cli.models.spec import parse_model_spec

        parse_model_spec(req.model)
    mask_source = make_region_source(req.mask, region_options) if req.mask else None
    if mask_source is not None and not explainer_cls.uses_region:
        raise UsageError(f"method {req.method!r} does not accept a region (--region/--mask)")
    if region_options:  # each source reads its own --set region_* options (auto: AUTO_OPTIONS)
        accepted = mask_source.option_defaults if mask_source is not None else {}
        foreign = sorted(set(region_options) - set(accepted))
        if foreign:
            where = (f"--region {mask_source.spec} reads {', '.join(accepted)}" if accepted
                     else "region options apply to --region auto only (or a region source that reads them)")
            raise UsageError(f"--set {foreign[0]}: {where}")

    device = resolve_device(req.device)
    labels = read_labels_file(req.labels_file) if req.labels_file else None
    classifier = load_classifier(
        spec, ClassifierOptions(device=device, labels=labels, trust_pickle=req.trust_pickle)
    )
    if mask_source is not None:
        try:
            mask_source.check(classifier)
        except BaseException:
            classifier.close()
            raise
    missing = set(explainer_cls.requires) - set(classifier.capabilities)
    if missing:
        bb = ", ".join(black_box_methods()) or "none installed"
        raise UsageError(
            f"method {req.method!r} needs classifier {', '.join(sorted(missing))}, which {spec} does not "
            f"provide (it is a black box); methods that work with black-box classifiers: {bb}"
        )
    fixed_target = None if req.target == "auto" else classifier.label_index(req.target)

    out = Path(req.out) if req.out else Path("cfx-runs") / f"{req.method}-{_safe_name(req.target)}"
    run = RunDir(out)
    try:
        run.check(resume=req.resume, overwrite=req.overwrite)
        if req.resume:
            _check_resume_matches(out, req.method, params, classifier.spec)
        # build the explainer (loads its models) before touching the run directory: a method that
        # cannot start leaves nothing behind
        context = ExplainContext(
            classifier=classifier, params=params, device=device, model=req.model,
            model_flags=req.model_flags, trust_pickle=req.trust_pickle, options=dict(req.options),
        )
        explainer = explainer_cls(context)
    except BaseException:
        classifier.close()
        raise
    done = run.prepare(resume=req.resume, overwrite=req.overwrite)
    for note in notes:  # only once the request is known to be valid
        print(note, file=sys.stderr)
    pending = [it for it in items if it.id not in done]

    info = {
        "cfx_run_version": 1,
        "method": req.method,
        "parameters": params,
        "target": req.target,
        "classifier": classifier.describe(),
        "model": req.model,
        "seed": req.seed,
        "seeds": req.seeds,
        "batch_size": req.batch_size,
        "device": device,
        "device_name": describe_device(device),
        # what was asked for; each record's params say what each method's forward calls actually ran on
        "backend": {k: req.options.get(k) for k in ("backend", "backend_precision", "channels_last", "compile")
                    if req.options.get(k) is not None},
        "versions": _versions(),
        "inputs": list(req.inputs),
        "mask": req.mask,
        "region_options": (mask_source.options or None) if mask_source is not None and (
            mask_source.spec == "auto" or mask_source.option_defaults) else None,
        "shard": req.shard,
        "command": _redacted_argv(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
    }
    run.write_run_json(info)

    counts = {s: 0 for s in ("flipped", "not_flipped", "skipped", "error")}
    for rec in done.values():
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    errors: list[str] = []
    t_work = time.monotonic()
    worker = BatchWorker(run, explainer, classifier, fixed_target, req, mask_source)
    batches = [pending[i : i + req.batch_size] for i in range(0, len(pending), req.batch_size)]
    if req.executor == "ray":
        from cfx_cli.executors.ray_executor import run_batches_on_ray

        classifier.close()  # the workers load their own copies
        results = run_batches_on_ray(batches, req, params, str(out), progress_stream=progress_stream)
    else:
        results = _run_batches_locally(batches, worker, req.method, progress_stream)
    for records in results:
        for rec in records:
            counts[rec["status"]] += 1
            if rec["status"] == "error":
                errors.append(rec["error"])

    info.update({
        "status": "finished",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": {
            "total_seconds": round(time.monotonic() - t_start, 3),
            "explain_seconds": round(time.monotonic() - t_work, 3),
            "setup_seconds": round(t_work - t_start, 3),
            "inputs_processed": len(pending),
        },
        "counts": counts,
    })
    run.write_run_json(info)
    if req.executor != "ray":
        classifier.close()
    _write_report(out, req)
    return ExplainSummary(out, counts, errors, time.monotonic() - t_start)


def _write_report(out: Path, req: ExplainRequest) -> None:
    from cfx_cli.report import write_run_report

    write_run_report(out, debug=bool(req.options.get("debug")))


class BatchWorker:
    """Explains batches of inputs into a run directory; one per process (local) or per Ray actor."""

    def __init__(self, run, explainer, classifier, fixed_target, req: ExplainRequest, mask_source) -> None:
        self.run, self.explainer, self.classifier = run, explainer, classifier
        self.fixed_target, self.req, self.mask_source = fixed_target, req, mask_source

    @classmethod
    def build(cls, req: ExplainRequest, params: dict, run_path: str) -> BatchWorker:
        """Load the classifier and the explainer from a validated request (what a Ray actor does once)."""
        from cfx_cli.classifiers import DEFAULT_SPEC, ClassifierOptions, load_classifier, read_labels_file
        from cfx_cli.devices import resolve_device
        from cfx_cli.explainers import ExplainContext
        from cfx_cli.regions import make_region_source, split_region_options
        from cfx_cli.runs import RunDir

        device = resolve_device(req.device)
        labels = read_labels_file(req.labels_file) if req.labels_file else None
        classifier = load_classifier(req.classifier or DEFAULT_SPEC,
                                     ClassifierOptions(device=device, labels=labels, trust_pickle=req.trust_pickle))
        fixed_target = None if req.target == "auto" else classifier.label_index(req.target)
        context = ExplainContext(classifier=classifier, params=params, device=device, model=req.model,
                                 model_flags=req.model_flags, trust_pickle=req.trust_pickle,
                                 options=dict(req.options))
        explainer = get_explainer_class(req.method)(context)
        mask_source = (make_region_source(req.mask, split_region_options(dict(req.set_options))[1])
                       if req.mask else None)
        return cls(RunDir(run_path), explainer, classifier, fixed_target, req, mask_source)

    def process(self, chunk: list[InputImage], skip_recorded: bool = False) -> list[dict]:
        """Explain one batch. ``skip_recorded`` makes a retried batch idempotent: inputs that a killed
        attempt already recorded are not explained (or recorded) twice."""
        if skip_recorded:
            from cfx_cli.runs import read_manifest

            recorded = {r["id"] for r in read_manifest(self.run.manifest_path)}
            chunk = [it for it in chunk if it.id not in recorded]
            if not chunk:
                return []
        return _process_batch(chunk, self.run, self.explainer, self.classifier, self.fixed_target, self.req,
                              self.mask_source)

    def close(self) -> None:
        self.classifier.close()


def _run_batches_locally(batches, worker: BatchWorker, method: str, progress_stream):
    from cfx_cli.progress import Progress

    with Progress(f"explain ({method})", sum(map(len, batches)), stream=progress_stream) as bar:
        for chunk in batches:
            yield worker.process(chunk)
            bar.advance(len(chunk))


def _check_resume_matches(out: Path, method: str, params: dict, spec: str) -> None:
    """Resuming with other settings would mix two experiments in one manifest: refuse."""
    import json

    from cfx_cli.runs import RUN_JSON

    try:
        old = json.loads((out / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # nothing (readable) to compare with
    before = (old.get("method"), old.get("parameters"), (old.get("classifier") or {}).get("spec"))
    now = (method, json.loads(json.dumps(params)), spec)
    if before != now:
        what = [name for name, a, b in zip(("method", "parameters", "classifier"), before, now, strict=True)
                if a != b]
        raise UsageError(
            f"--resume: {out} was made with a different {' and '.join(what)}; resume with the same options, "
            "or use --overwrite or another --out"
        )


SEEDS_DIR = "seeds"


def run_explain_seeds(req: ExplainRequest, progress_stream=None) -> list[ExplainSummary]:
    """``--seeds N``: the run with ``req.seed`` in RUN_DIR as usual, then one complete run per extra seed in
    ``RUN_DIR/seeds/K`` (K = 1 … N−1, run seed ``req.seed + K``), each a run directory of its own with the
    same ids, so diversity metrics pair counterfactuals by id."""
    from dataclasses import replace

    if req.seeds < 1:
        raise UsageError(f"--seeds {req.seeds}: must be at least 1")
    first = run_explain(req, progress_stream)
    summaries = [first]
    for k in range(1, req.seeds):
        sub = replace(req, out=str(Path(first.run_dir) / SEEDS_DIR / str(k)), seed=req.seed + k, seeds=1)
        summaries.append(run_explain(sub, progress_stream))
    return summaries


def _safe_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "target"


def _redacted_argv() -> list[str]:
    # Tokens come from the environment, never argv; still drop anything that looks like a credential.
    return [("<redacted>" if any(k in a.lower() for k in ("token=", "bearer ", "password=")) else a)
            for a in sys.argv]


def _error_record(item: InputImage, message: str, seed: int) -> dict:
    return {
        "id": item.id, "source": str(item.path), "status": "error", "error": message,
        "source_label": None, "source_prob": None, "target_label": None, "target_prob_before": None,
        "target_prob_after": None, "cf_label": None, "counterfactual": None, "original": None,
        "mask": None, "params": None, "seed": seed, "seconds": None, "nfe": None,
    }


def _process_batch(chunk, run, explainer, classifier, fixed_target, req, mask_source) -> list[dict]:
    from cfx_cli.images import decode, resize, to_uint8

    device = explainer.context.device
    records: list[dict] = []
    good: list[tuple[InputImage, np.ndarray, np.ndarray | None]] = []
    size = classifier.input_size
    for item in chunk:
        seed = image_seed(req.seed, item.id)
        try:
            # quantize as the saved original will be, so the manifest describes the files on disk
            arr = to_uint8(resize(decode(item.path), size)).astype(np.float32) / 255.0
            mask = (mask_source.mask_for(item, arr.shape[:2], image=arr, classifier=classifier)
                    if mask_source else None)
        except InputError as exc:
            rec = _error_record(item, str(exc), seed)
            run.append(rec)
            records.append(rec)
            continue
        good.append((item, arr, mask))
    if not good:
        return records
    # Inputs of a size-agnostic classifier may differ in size: explain each size group together.
    groups: dict[tuple[int, int], list] = {}
    for entry in good:
        groups.setdefault(entry[1].shape[:2], []).append(entry)
    for entries in groups.values():
        records.extend(_explain_group(entries, run, explainer, classifier, fixed_target, req, device))
    return records


def _explain_group(entries, run, explainer, classifier, fixed_target, req, device) -> list[dict]:
    import torch

    from cfx_cli.explainers import ExplainBatch
    from cfx_cli.images import save_png

    t0 = time.monotonic()
    seeds = [image_seed(req.seed, item.id) for item, _, _ in entries]
    images = torch.from_numpy(np.stack([a for _, a, _ in entries])).permute(0, 3, 1, 2).contiguous()
    try:
        probs, refused = predict_partly(classifier, images.to(device))
    except CfxError as exc:
        return _fail_all(entries, run, seeds, f"classifier failed: {exc}")
    except Exception as exc:
        return _fail_all(entries, run, seeds, f"classifier failed: {type(exc).__name__}: {exc}")
    records: list[dict] = []
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
    if fixed_target is None:  # auto: the most probable class other than the predicted one
        masked = probs.clone()
        masked[torch.arange(len(src)), src] = -1.0
        targets = masked.argmax(dim=1)
    else:
        targets = torch.full_like(src, fixed_target)

    todo = [i for i in range(len(entries)) if int(src[i]) != int(targets[i])]
    base = []
    for i, (item, arr, _mask) in enumerate(entries):
        orig_path = run.image_path("originals", item.id)
        save_png(arr, orig_path)
        base.append({
            "id": item.id, "source": str(item.path), "status": None, "error": None,
            "source_label": labels[int(src[i])], "source_prob": round(float(probs[i, src[i]]), 6),
            "target_label": labels[int(targets[i])],
            "target_prob_before": round(float(probs[i, targets[i]]), 6),
            "target_prob_after": None, "cf_label": None, "counterfactual": None,
            "original": run.relative(orig_path), "mask": None, "params": None, "seed": seeds[i],
            "seconds": None, "nfe": None,
        })
    for i in range(len(entries)):
        if i not in todo:
            rec = base[i] | {"status": "skipped", "params": None, "seconds": 0.0, "nfe": 0}
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
        outputs = explainer.explain(batch)
        if len(outputs) != len(todo):
            raise RuntimeError(f"explainer returned {len(outputs)} outputs for {len(todo)} images")
        cfs = torch.stack([o.counterfactual.detach().float().cpu().clamp(0, 1) for o in outputs])
        cfs = torch.round(cfs * 255.0) / 255.0  # classify exactly what the saved PNG holds
        after, refused = predict_partly(classifier, cfs.to(device))
        after = after.cpu()
    except CfxError as exc:
        return records + _fail_all([entries[i] for i in todo], run, [seeds[i] for i in todo], str(exc))
    except Exception as exc:
        if explainer.context.options.get("debug"):
            raise
        msg = f"{req.method} failed: {type(exc).__name__}: {exc}"
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
        rec = base[i] | {
            "status": "flipped" if cf_label == tgt else "not_flipped",
            "target_prob_after": round(float(after[j, tgt]), 6),
            "cf_label": labels[cf_label],
            "counterfactual": run.relative(cf_path),
            "mask": mask_rel,
            "params": out.params,
            "seconds": round(per_image, 4),
            "nfe": int(out.nfe),
        }
        run.append(rec)
        records.append(rec)
    return records


def _fail_all(entries, run, seeds, message: str) -> list[dict]:
    records = []
    for (item, _, _), seed in zip(entries, seeds, strict=True):
        rec = _error_record(item, message if str(item.path) in message else f"{item.path}: {message}", seed)
        run.append(rec)
        records.append(rec)
    return records
