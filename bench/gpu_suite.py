"""Every method at its published resolution and settings, per precision / compile / batch variant, as users run it.

    python bench/gpu_suite.py --out gpu.json            # on a GPU: the published shapes (budget: 8 min on an H100)
    python bench/gpu_suite.py --tiny --out tiny.json    # CPU, seconds: the demo models (what the tests run)

Models have random weights with the published shapes, built once into ``--work`` (default: a temporary folder):

  dime  ADM 128² (DiME's CelebA flags, catalog.py), preset celeba (τ = 60 of 200 respaced steps, VGG19 loss)
  ace   ADM 256² (ACE's CelebA-HQ flags), preset celebahq (respacing 25, τ = 5, 50 iterations)
  rcsb  I2SB 256² bridge (I2SB's ADM flags, JSON sidecar), preset A (τ = 0.6, 100 NFE), region auto
  time  SD-1.x at 512² (bench/make_random_sd.py), τ = 35 of 50 steps, w = 4, random tokens
  eced  the same SD-1.x, the defaults (50 steps, τ = 25, T₂ = 20 attack iterations, N = 100 Alg. 2 iterations)
  pgd   no generative model (masked PGD, 50 iterations)

and one classifier of ResNet-50 size (``cfx_plugins.nets.resnet.ResNet50``, 2 classes, random weights, loaded
through the ``python:`` adapter at each method's resolution). ADM's ``use_fp16`` flag is off, so the fp32 rows
are fp32 and half precision comes only from ``--precision``. Retries are off (DiME one λ_c, TIME one (τ, w),
ECED ``early_stop=false``), so every variant of a method does the same work.

Every explanation goes through ``cfx_cli.explain`` (the pipeline ``cfx explain`` runs: request resolution, the
batch worker, PNGs, the manifest). Per method: one fp32 batch-1 run of one image under torch's FlopCounterMode
(``bench/flops.py``: matmul/conv/attention FLOPs, forward and backward) that also loads the models and warms
them up; then per variant ``--batches`` batches (default 1; a compile variant runs one more first, where it
compiles, excluded). Seconds per explanation = the median of the manifest's per-image ``seconds`` of the timed
batches (classification and the explanation, not PNG writing or loading). Peak memory =
``torch.cuda.max_memory_allocated`` over the variant (models included); memory per image = the fp32 peak's growth
from batch 1 to the bigger batch. The share of peak divides FLOPs per explanation ÷ seconds by the device's
measured dense matmul rate (bf16 on CUDA, 8192³; fp32 sgemm on a CPU): one reference for every row.

Variants, in the order they run: ``fp32`` (eager, the published regime: the reference of every ratio),
``fp16_graphs`` (``--precision fp16 --compile --compile-mode reduce-overhead``, CUDA only), ``fp16``, ``fp32_bB``,
``fp16_bB``, ``bf16`` (ACE, RCSB and ECED run ``fp16_graphs`` last: their compile includes a backward graph), then
on CUDA ``fp16_best``: the biggest fp16 batch (up to 16) that the fp32 rows' memory growth says fits in 90 % of the
device and whose batch ends within the method's time left (``best_batch``).
RCSB, ECED and PGD have no forward-only calls: ``--precision`` runs their differentiated
calls under autocast and ``--compile`` compiles the generative network they differentiate (``cfx_cli.backends.grad``);
PGD's only network is the classifier, so its ``fp16_graphs`` row says ``--compile`` does not apply. Every row but the
reference also gives the max and mean |Δ| of its counterfactuals from the fp32 run's (same images), and what ran
(each record's ``backend`` / ``gradients``).

``--budget S`` (default 450 s) splits the time between methods (each gets the time left ÷ the methods left, so what
a cheap method leaves goes to the next; ECED, the dearest, runs last); a method's variants that would start past its
share are recorded as skipped, so the suite ends close to its budget whatever the device (one variant may overrun).
``--quick`` shortens DiME (τ 20) and ECED (T₂ 5, N 20).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flops import count_flops, measure_sgemm_peak  # noqa: E402
from make_random_sd import build as build_random_sd  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from time_sd_backends import matmul_peak as dense_peak  # noqa: E402
from torch import nn  # noqa: E402

from cfx_cli.demo import LABELS as DIGITS  # noqa: E402
from cfx_cli.explain.pipeline import run_explain  # noqa: E402
from cfx_cli.explain.request import ExplainRequest  # noqa: E402
from cfx_cli.explainers import RunOptions  # noqa: E402
from cfx_cli.models.adm.flags import flags_from_mapping, load_flags  # noqa: E402
from cfx_cli.models.adm.loader import build_unet  # noqa: E402
from cfx_cli.models.catalog import KNOWN_MODELS  # noqa: E402
from cfx_cli.models.i2sb import BRIDGE_DEFAULTS, I2SB_ADM_FLAGS  # noqa: E402
from cfx_cli.models.memory import MemoryOptions  # noqa: E402
from cfx_cli.models.spec import load_model  # noqa: E402
from cfx_cli.plugins import get_explainer_class  # noqa: E402
from cfx_plugins.explainers.dime import build_vgg19_features  # noqa: E402
from cfx_plugins.explainers.time import tokens as T  # noqa: E402
from cfx_plugins.explainers.time.fit import FIT_AUTO_PRESETS, FIT_PARAMS, FIT_PRESETS  # noqa: E402
from cfx_plugins.nets.resnet import ResNet50  # noqa: E402

LABELS = ["class0", "class1"]
N_IMAGES = 16  # the most images one variant explains (the best-batch row's cap)


def _catalog_flags(name: str) -> str:
    """The --model-flags string of a catalog entry (the published network), with use_fp16 off."""
    entry = next(m for m in KNOWN_MODELS if m.name == name)
    flags = entry.spec.split('--model-flags "', 1)[1].rstrip('"')
    return flags.replace("--use_fp16 True", "--use_fp16 False")


@dataclass
class Method:
    name: str
    size: int  # the classifier's input size = the explanation's resolution
    model: str | None  # a key of the built models, or a demo spec in tiny mode
    params: dict[str, Any]
    quick: dict[str, Any] = field(default_factory=dict)
    flags: str | None = None


def published_methods() -> list[Method]:
    """Cheapest first: each method's budget share grows by what the earlier ones left (ECED last)."""
    return [
        Method("pgd", 256, None, {}),
        Method("time", 512, "sd", {"schedule": "35:4", "steps": 50}),
        Method("ace", 256, "adm256", {"preset": "celebahq"},
               flags=_catalog_flags("ACE CelebA-HQ ADM (256, 500 steps)")),
        Method("rcsb", 256, "i2sb256", {"preset": "A"}),
        Method("dime", 128, "adm128", {"preset": "celeba", "scales": "8.0"}, {"tau": 20},
               flags=_catalog_flags("DiME CelebA ADM (128, 500 steps)")),
        Method("eced", 512, "sd", {"preset": "celebahq", "early_stop": False},
               {"iterations": 5, "bg_iterations": 20}),
    ]


def tiny_methods() -> list[Method]:
    """The demo models at their 16² size with the demo classifier; a few steps each (seconds on a CPU)."""
    return [
        Method("dime", 16, "demo:pixel", {"preset": "digits", "tau": 4, "scales": "10.0"}),
        Method("ace", 16, "demo:pixel", {"preset": "digits", "iterations": 3}),
        Method("rcsb", 16, "demo:bridge", {"preset": "digits", "nfe": 4}),
        Method("time", 16, "demo:latent", {"preset": "digits", "schedule": "4:4", "steps": 8}),
        Method("eced", 16, "demo:latent", {"preset": "digits", "steps": 8, "tau": 3, "iterations": 2,
                                           "bg_iterations": 2, "early_stop": False}),
        Method("pgd", 16, None, {"preset": "digits", "iterations": 5}),
    ]


# ------------------------------------------------------------------------------------------ building the inputs
def resnet50_classifier():
    """``python:bench/gpu_suite.py:resnet50_classifier``: ResNet-50's shape, 2 classes, random weights."""


    net = ResNet50(fc=nn.Linear(2048, len(LABELS)))
    net.labels = LABELS
    return net.eval()


def build_classifier(work: Path) -> str:
    """Random ResNet-50 weights (seed 0) as safetensors; → the spec without its #size option."""
    path = work / "resnet50.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in resnet50_classifier().state_dict().items()}, str(path))
    return f"python:{Path(__file__).resolve()}:resnet50_classifier@{path}"


def build_adm(work: Path, name: str, flags: str) -> str:


    path = work / f"{name}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in build_unet(load_flags(flags)).state_dict().items()}, str(path))
    return f"adm:{path}"


def build_vgg(work: Path) -> Path:
    """DiME's perceptual network (VGG19 ``features[:18]``, the celeba preset's layer) with random weights."""


    path = work / "vgg19.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in build_vgg19_features(18).state_dict().items()}, str(path))
    return path


def build_i2sb(work: Path) -> str:
    """An I2SB checkpoint of the published network (``{"net": state dict}``) with its options as JSON."""


    path = work / "i2sb256.pt"
    if not path.exists():
        torch.manual_seed(0)
        net = build_unet(flags_from_mapping(I2SB_ADM_FLAGS, "i2sb defaults"))
        torch.save({"net": net.state_dict()}, path)
        options = {**BRIDGE_DEFAULTS, "corrupt": "inpaint-freeform2030", "image_size": 256}
        path.with_suffix(".json").write_text(json.dumps(options))
    return f"i2sb:{path}"


def build_sd(work: Path) -> str:
    folder = work / "sd1"
    if not (folder / "unet").exists():
        build_random_sd(folder)
    return f"diffusers:{folder}"


def write_tokens(work: Path, model_spec: str, classifier_spec: str, labels: list[str]) -> Path:
    """A TIME token file of random vectors for ``model_spec`` (what `cfx fit time` writes, without the fit:
    random weights make a fit meaningless, and timing the explanation is what this measures)."""


    # the prompts and token counts `cfx fit time` uses for this model (its automatic preset, else the defaults)
    fit = {p.name: p.default for p in FIT_PARAMS}
    fit.update(FIT_PRESETS.get(FIT_AUTO_PRESETS.get(model_spec, ""), {}))
    n = int(fit["num_tokens"])
    model = load_model(model_spec, None, "cpu", False, MemoryOptions(), expect="latent", method="time")
    ctx = T.context_token_names(n)
    classes = {label: T.class_token_names(k, n) for k, label in enumerate(labels)}
    g = torch.Generator().manual_seed(0)
    vectors = {name: 0.01 * torch.randn(model.embedding_dim, generator=g)
               for name in ctx + [name for v in classes.values() for name in v]}
    meta = {"tokens": {"context": ctx, "classes": classes}, "labels": labels, "classifier": {"spec": classifier_spec},
            "base_model": model.spec, "embedding_dim": model.embedding_dim, "fit_preset": None,
            "prompts": {"context": fit["context_prompt"], "class": fit["class_prompt"]}}
    st, _ = T.save_artifact(work / f"tokens-{model_spec.split(':')[0]}", vectors, meta)
    return st


def write_images(work: Path, size: int, n: int = N_IMAGES) -> Path:
    """Smooth random colour images (seeded), one folder per size."""
    folder = work / f"images-{size}"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(size)
        for i in range(n):
            coarse = rng.random((8, 8, 3))
            img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            img.save(folder / f"img-{i:02d}.png")
    return folder


# ------------------------------------------------------------------------------------------ running and timing
@dataclass
class Variant:
    name: str
    batch: int
    precision: str = "fp32"
    compile: bool | str = False


def variants(big_batch: int, cuda: bool) -> list[Variant]:
    """In the order they run: the reference, the fast path, then the rest (the budget may cut the tail)."""
    out = [Variant("fp32", 1)]
    if cuda:  # CUDA graphs; inductor's CPU compile would take minutes here and measure nothing of interest
        out.append(Variant("fp16_graphs", 1, "fp16", "reduce-overhead"))
    out += [Variant("fp16", 1, "fp16"), Variant(f"fp32_b{big_batch}", big_batch),
            Variant(f"fp16_b{big_batch}", big_batch, "fp16"), Variant("bf16", 1, "bf16")]
    return out


def forward_calls(method: Method) -> bool:
    """Has the method forward-only calls (``uses_backend``: --backend torch applies to them)?"""
    return get_explainer_class(method.name).uses_backend


def compiles(method: Method) -> bool:
    """Does ``--compile`` apply to the method (forward-only calls, or a differentiated generative network)?"""
    cls = get_explainer_class(method.name)
    return cls.uses_backend or "compile" in cls.gradient_options


def compiles_backward(method: Method) -> bool:
    """Does its ``--compile`` compile a backward graph (a differentiated generative network)?"""
    return "compile" in get_explainer_class(method.name).gradient_options


def method_order(method: Method, chosen: list[Variant]) -> list[Variant]:
    """The variants in the order ``method`` runs them: a compile variant compiles a backward graph for the methods
    that differentiate a generative network (minutes at SD size), so there it runs last, where the budget may cut it
    without costing the other variants."""
    if compiles_backward(method):
        return sorted(chosen, key=lambda v: bool(v.compile))  # stable: the rest keep their order
    return list(chosen)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def explain(method: Method, setup: dict, out: Path, limit: int, batch: int, precision: str = "fp32",
            compile_: bool | str = False) -> list[dict]:
    """One `cfx explain` run in-process; → its manifest records. Its chatter (notes, progress) is kept."""
    params = dict(method.params)
    if method.name == "time":
        params["tokens"] = str(setup["tokens"])
    if method.name == "dime" and "vgg" in setup:
        params["perc_weights"] = str(setup["vgg"])
    backend = precision != "fp32" or bool(compile_)
    options = RunOptions(backend="torch" if backend and forward_calls(method) else "auto",
                         backend_precision=precision, compile=compile_ if compiles(method) else False)
    req = ExplainRequest(inputs=[str(setup["images"][method.size])], method=method.name, target="auto",
                         classifier=setup["classifier"](method.size), out=str(out), batch_size=batch, seed=0,
                         device=setup["device"], set_options=params, limit=limit, overwrite=True,
                         model=setup["models"].get(method.model, method.model), model_flags=method.flags,
                         options=options)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        run_explain(req, progress_stream=log)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["status"] == "error"]
    if bad:
        raise RuntimeError(f"{method.name}: {bad[0]['error']}")
    return records


def run_variant(method: Method, variant: Variant, setup: dict, work: Path, batches: int) -> dict:
    device = setup["device"]
    cuda = device.startswith("cuda")
    row: dict[str, Any] = {"method": method.name, "variant": variant.name, "batch": variant.batch,
                           "precision": variant.precision, "compile": variant.compile}
    if not compiles(method) and variant.compile:
        return {**row, "status": "n/a: --compile does not apply (no generative network; the classifier runs as given)"}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    warmup = 1 if variant.compile else 0  # the compiling batch
    records = explain(method, setup, work / "runs" / f"{method.name}-{variant.name}",
                      variant.batch * (batches + warmup), variant.batch, variant.precision, variant.compile)
    sync(device)
    wall = time.perf_counter() - t0
    timed = [r for r in records[variant.batch * warmup:] if r["status"] != "skipped"] or records
    row.update(status="ok", images=len(records), wall_seconds=round(wall, 3),
               seconds=round(statistics.median(r["seconds"] for r in timed), 4),
               warmup_seconds=records[0]["seconds"], nfe=records[0].get("nfe"),
               ran={k: records[0]["params"][k] for k in ("backend", "gradients") if k in records[0]["params"]})
    if cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def difference_from_fp32(work: Path, method: Method, variant: Variant) -> dict[str, float]:
    """Max and mean |Δ| (8-bit PNGs in [0, 1]) of the variant's counterfactuals from the fp32 batch-1 run's, over the
    images both runs explained: how far the precision moved the method's output."""
    runs = work / "runs"
    ref_dir, got_dir = runs / f"{method.name}-fp32", runs / f"{method.name}-{variant.name}"

    def load(folder: Path) -> dict[str, np.ndarray]:
        out = {}
        for line in (folder / "manifest.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("counterfactual"):
                out[r["id"]] = np.asarray(Image.open(folder / r["counterfactual"]), dtype=np.float64) / 255
        return out

    ref, got = load(ref_dir), load(got_dir)
    common = sorted(set(ref) & set(got))
    if not common:
        return {}
    diffs = [np.abs(got[k] - ref[k]) for k in common]
    return {"max_abs_diff_vs_fp32": round(float(max(d.max() for d in diffs)), 4),
            "mean_abs_diff_vs_fp32": round(float(np.mean([d.mean() for d in diffs])), 5)}


def count_method_flops(method: Method, setup: dict, work: Path) -> int:
    flops, _ = count_flops(explain, method, setup, work / "runs" / f"{method.name}-flops", 1, 1)
    return flops


def matmul_peak(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return dense_peak(device, torch.bfloat16), "bf16 dense matmul 8192³ (median)"
    peak = measure_sgemm_peak(sizes=(512, 1024), repeats=3, min_seconds=0.02)
    return peak.flops_per_s, f"fp32 sgemm, {peak.threads} thread(s)"


def prepare(args, work: Path, methods: list[Method]) -> dict:
    sizes = {m.size for m in methods}
    setup: dict[str, Any] = {"device": args.device, "images": {s: write_images(work, s) for s in sizes}}
    if args.tiny:
        setup["classifier"] = lambda size: "demo:digits"
        setup["models"] = {}
        if any(m.name == "time" for m in methods):
            setup["tokens"] = write_tokens(work, "demo:latent", "demo:digits", list(DIGITS))
        return setup
    spec = build_classifier(work)
    setup["classifier"] = lambda size: f"{spec}#size={size}"
    wanted = {m.model for m in methods}
    models: dict[str, str] = {}
    for m in methods:
        if m.model == "adm128" or m.model == "adm256":
            models[m.model] = build_adm(work, m.model, m.flags or "")
    if any(m.name == "dime" for m in methods):
        setup["vgg"] = build_vgg(work)
    if "i2sb256" in wanted:
        models["i2sb256"] = build_i2sb(work)
    if "sd" in wanted:
        models["sd"] = build_sd(work)
        if any(m.name == "time" for m in methods):
            setup["tokens"] = write_tokens(work, models["sd"], spec + "#size=512", LABELS)
    setup["models"] = models
    return setup


def best_batch(rows: list[dict], method: str, big: int, memory_gib: float, seconds_left: float,
               cap: int = N_IMAGES) -> int | None:
    """The biggest fp16 batch worth timing for ``method``: its peak, modelled as peak(1) + (B − 1) · m from the fp32
    rows (m = the per-image growth; fp16 needs less), stays within 90 % of the device's ``memory_gib``, and one batch
    at the ``fp16_b{big}`` row's seconds per explanation ends within ``seconds_left``; at most ``cap``. None when
    that is not above ``big`` (already measured) or the rows are missing."""
    ok = {r["variant"]: r for r in rows if r.get("method") == method and r.get("status") == "ok"}
    one, many, half = ok.get("fp32"), ok.get(f"fp32_b{big}"), ok.get(f"fp16_b{big}")
    if not (one and many and half and "peak_memory_gib" in one and "peak_memory_gib" in many) or big < 2:
        return None
    per = max((many["peak_memory_gib"] - one["peak_memory_gib"]) / (big - 1), 1e-3)
    by_memory = 1 + int((0.9 * memory_gib - one["peak_memory_gib"]) / per)
    by_time = int(seconds_left / half["seconds"]) if half["seconds"] > 0 else cap
    batch = min(cap, by_memory, by_time)
    return batch if batch > big else None


def memory_per_image(rows: list[dict], big: int) -> dict[str, float]:
    """GiB per image of each method: the fp32 peak's growth from batch 1 to batch ``big``, ÷ (big − 1)."""
    peaks = {(r["method"], r["batch"]): r["peak_memory_gib"] for r in rows
             if r.get("status") == "ok" and r.get("precision") == "fp32" and "peak_memory_gib" in r}
    return {m: round((peaks[m, big] - peaks[m, 1]) / (big - 1), 3) for m, b in peaks
            if b == 1 and (m, big) in peaks and big > 1}


def table(rows: list[dict]) -> str:
    ref = {r["method"]: r["seconds"] for r in rows if r["variant"] == "fp32" and r.get("status") == "ok"}
    lines = ["| method | variant | s / explanation | vs fp32 b1 | peak GiB | GFLOPs / expl. | share of peak | "
             "max / mean \\|Δ\\| vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['variant']} | {r.get('status')} | | | | | |")
            continue
        diff = (f"{r['max_abs_diff_vs_fp32']:.3g} / {r['mean_abs_diff_vs_fp32']:.2g}"
                if "max_abs_diff_vs_fp32" in r else "")
        ratio = f"{ref[r['method']] / r['seconds']:.2f}×" if r["method"] in ref and r["seconds"] else ""
        share = f"{100 * r['share_of_peak']:.1f} %" if r.get("share_of_peak") is not None else ""
        gflops = f"{r['flops'] / 1e9:.3g}" if r.get("flops") else ""
        lines.append(f"| {r['method']} | {r['variant']} | {r['seconds']:.4g} | {ratio} | "
                     f"{r.get('peak_memory_gib', '')} | {gflops} | {share} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the demo models on the CPU (seconds; what the tests run)")
    ap.add_argument("--quick", action="store_true", help="shorter DiME (τ 20) and ECED (T₂ 5, N 20)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--methods", default="", help="comma list (default: all)")
    ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
    ap.add_argument("--batch", type=int, default=None, help="the bigger batch (default 4; 2 with --tiny)")
    ap.add_argument("--batches", type=int, default=1, help="timed batches per variant (compile: +1 to compile)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite (split per method)")
    ap.add_argument("--work", default=None, help="folder for the built models and runs (reused if present)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)


    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    cuda = args.device.startswith("cuda")
    methods = tiny_methods() if args.tiny else published_methods()
    if args.methods:
        keep = set(args.methods.split(","))
        methods = [m for m in methods if m.name in keep]
    if args.quick:
        for m in methods:
            m.params.update(m.quick)
    big = args.batch or (2 if args.tiny else 4)
    chosen = variants(big, cuda)
    if args.variants:
        keep = set(args.variants.split(","))
        chosen = [v for v in chosen if v.name in keep]

    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        setup = prepare(args, work, methods)
        t_built = time.perf_counter()
        peak, peak_what = matmul_peak(args.device)
        rows: list[dict] = []
        for k, method in enumerate(methods):
            t_method = time.perf_counter()
            share = (args.budget - (t_method - t_start)) / (len(methods) - k)
            try:
                flops = count_method_flops(method, setup, work)
            except Exception as exc:  # a method that cannot run here fails its rows, never the suite
                rows += [{"method": method.name, "variant": v.name, "status": f"error: {exc}"} for v in chosen]
                continue
            for v in method_order(method, chosen):
                if time.perf_counter() - t_method > share:
                    rows.append({"method": method.name, "variant": v.name,
                                 "status": f"skipped: past the method's {share:.0f} s share of --budget"})
                    continue
                try:
                    row = run_variant(method, v, setup, work, args.batches)
                except Exception as exc:
                    row = {"method": method.name, "variant": v.name, "status": f"error: {type(exc).__name__}: {exc}"}
                if row.get("status") == "ok":
                    if v.name != "fp32":
                        row.update(difference_from_fp32(work, method, v))
                    row["flops"] = flops
                    row["share_of_peak"] = round(flops / row["seconds"] / peak, 5) if row["seconds"] else None
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if cuda and not args.variants:  # then the biggest fp16 batch that fits the device and the time left
                total = torch.cuda.get_device_properties(args.device).total_memory / 2**30
                left = share - (time.perf_counter() - t_method)
                b = best_batch(rows, method.name, big, total, left)
                if b is not None:
                    v = Variant("fp16_best", b, "fp16")
                    try:
                        row = run_variant(method, v, setup, work, args.batches)
                        row.update(difference_from_fp32(work, method, v), flops=flops)
                        row["share_of_peak"] = round(flops / row["seconds"] / peak, 5) if row["seconds"] else None
                    except Exception as exc:
                        row = {"method": method.name, "variant": v.name, "batch": b,
                               "status": f"error: {type(exc).__name__}: {exc}"}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    memory = memory_per_image(rows, big)
    device_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    result = {"device": device_name, "tiny": args.tiny, "quick": args.quick, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "matmul_peak_flops": peak, "matmul_peak": peak_what,
              "build_seconds": round(t_built - t_start, 2),
              "total_seconds": round(time.perf_counter() - t_start, 2), "memory_per_image_gib": memory,
              "rows": rows}
    print(f"device {device_name}; peak {peak / 1e12:.3g} TFLOP/s ({peak_what}); "
          f"total {result['total_seconds']} s (models built in {result['build_seconds']} s)")
    print(table(rows))
    if memory:
        print("memory per image (GiB, fp32, peak growth from batch 1 to batch "
              f"{big}): " + ", ".join(f"{m} {v}" for m, v in memory.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r.get("status") == "ok" or str(r.get("status")).startswith(("n/a", "skipped")) for r in rows) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
