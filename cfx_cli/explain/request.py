"""What ``cfx explain`` was asked (:class:`ExplainRequest`) and its resolution (:class:`ExplainPlan`): the method,
its parameters (presets, auto-presets, ``--set``), the region source and its options, the inputs and the
executor, all checked once, before any model is loaded or any file written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfx_cli.classifiers import DEFAULT_SPEC, get_adapter, read_labels_file
from cfx_cli.errors import UsageError
from cfx_cli.explain.executors import Executor, get_executor
from cfx_cli.explainers import Explainer, RunOptions
from cfx_cli.images import InputImage, discover
from cfx_cli.models.spec import parse_model_spec
from cfx_cli.params import resolve_params
from cfx_cli.plugins import get_explainer_class
from cfx_cli.regions import RegionSource, make_region_source, region_source_class, split_region_options


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
    set_options: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE: the method's and region_*
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    model: str | None = None
    model_flags: str | None = None
    labels_file: str | None = None
    trust_pickle: bool = False
    mask: str | None = None  # --region / --mask
    shard: str | None = None  # "i/n": explain every n-th input starting at i
    executor: str = "local"  # a name of cfx_cli.explain.executors.EXECUTORS
    ray_address: str | None = None
    workers: int = 2  # Ray actors
    gpus_per_worker: float = 0.0
    options: RunOptions = field(default_factory=RunOptions)
    seeds: int = 1  # --seeds N: N explanations per input (RUN_DIR, then RUN_DIR/seeds/K with seed + K)


@dataclass
class ExplainPlan:
    """A validated request: everything the workers need, resolved once."""

    req: ExplainRequest
    explainer_cls: type[Explainer]
    spec: str  # the classifier spec
    labels: list[str] | None  # --labels FILE, read once
    params: dict[str, Any]
    region: RegionSource | None
    items: list[InputImage]
    out: Path
    executor: Executor
    notes: list[str] = field(default_factory=list)  # printed once the run directory is prepared

    @property
    def method(self) -> str:
        return self.req.method


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` → (i, n); shards are round-robin over the sorted inputs, so they are deterministic."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "target"


def resolve(req: ExplainRequest) -> ExplainPlan:
    """Check the request and resolve its defaults; raises :class:`UsageError` before any work."""
    explainer_cls = get_explainer_class(req.method)
    spec = req.classifier or DEFAULT_SPEC
    get_adapter(spec)  # an unknown scheme is a usage error now, not after the inputs are found
    set_options, region_options = split_region_options(dict(req.set_options))
    notes: list[str] = []
    auto = None if "preset" in set_options else explainer_cls.auto_preset(spec, req.model, dict(set_options))
    if auto is not None:
        set_options["preset"] = auto[0]
        notes.append(f"note: using {req.method} preset {auto[0]!r} {auto[1]} "
                     "(override with --set preset=NAME or individual --set values)")
    params = resolve_params(req.method, explainer_cls.params, explainer_cls.presets, set_options)
    region_spec, default_region = req.mask, explainer_cls.default_region
    if not region_spec and default_region:
        region_spec = default_region
        notes.append(f"note: {req.method} uses --region {region_spec} (override with --region FILE|DIR)")
    if region_spec:  # a preset's region options, those the chosen source reads; explicit --set values win
        source_cls, _ = region_source_class(region_spec)
        preset_region = explainer_cls.region_presets.get(set_options.get("preset"), {})
        region_options = {**{k: v for k, v in preset_region.items() if k in source_cls.option_defaults},
                          **region_options}
    executor = get_executor(req.executor)
    executor.check(req)
    if req.batch_size < 1:
        raise UsageError(f"--batch-size {req.batch_size}: must be at least 1")
    if req.limit is not None and req.limit < 1:
        raise UsageError(f"--limit {req.limit}: must be at least 1")
    items = discover(req.inputs)
    if not items:
        raise UsageError(f"no images found in {', '.join(req.inputs)} (looked for png, jpg, jpeg, bmp, webp)")
    if req.limit is not None:
        items = items[: req.limit]
    if req.shard:
        i, n = parse_shard(req.shard)
        items = items[i::n]
    if req.model:  # a malformed --model is a usage error before any work (loading happens in the explainer)
        parse_model_spec(req.model)
    region = make_region_source(region_spec, region_options) if region_spec else None
    if region is not None and not explainer_cls.uses_region:
        raise UsageError(f"method {req.method!r} does not accept a region (--region/--mask)")
    if region_options:  # each source reads its own --set region_* options
        accepted = region.option_defaults if region is not None else {}
        foreign = sorted(set(region_options) - set(accepted))
        if foreign:
            where = (f"--region {region.spec} reads {', '.join(accepted)}" if accepted
                     else "region options apply to --region auto only (or a region source that reads them)")
            raise UsageError(f"--set {foreign[0]}: {where}")
    if not explainer_cls.uses_backend:
        flags = {"backend": "--backend", "precision": "--precision", "channels_last": "--channels-last",
                 "compile": "--compile"}
        refused = [flags[o] for o in req.options.requested() if o not in explainer_cls.gradient_options]
        if refused:
            grads = explainer_cls.gradient_options
            ok = [flags[o] for o in flags if o in grads]
            why = (f"its network calls carry gradients; of these options only {', '.join(ok)} "
                   f"{'applies' if len(ok) == 1 else 'apply'} to them" if ok
                   else "it runs no network calls these options apply to")
            raise UsageError(f"method {req.method!r} runs no forward-only network calls on a backend: "
                             f"{', '.join(refused)} {'does' if len(refused) == 1 else 'do'} not apply ({why})")
    labels = read_labels_file(req.labels_file) if req.labels_file else None
    out = Path(req.out) if req.out else Path("cfx-runs") / f"{req.method}-{safe_name(req.target)}"
    return ExplainPlan(req, explainer_cls, spec, labels, params, region, items, out, executor, notes)
