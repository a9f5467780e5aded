"""The ``cfx`` command line. Commands parse options, call into the core and print; nothing heavy
is imported at module level so that ``cfx --help`` never loads torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cfx_cli import __version__
from cfx_cli.backends.accelerate import accelerate_model
from cfx_cli.classify import classify_inputs, render_table
from cfx_cli.cli_support import (
    FitGroup,
    RootGroup,
    check_backend,
    check_compile,
    check_precision,
    load_config,
    plugin_commands,
    show,
)
from cfx_cli.devices import resolve_device
from cfx_cli.errors import CfxError, UsageError
from cfx_cli.explainers import RunOptions
from cfx_cli.models import load_model
from cfx_cli.models.catalog import collect, describe, render_text
from cfx_cli.params import parse_set_options
from cfx_cli.plugins import get_explainer_class, get_registry
from cfx_cli.quiet import configure_cli_output, debug_enabled
from cfx_cli.serve import serve as serve_classifier

app = typer.Typer(
    name="cfx",
    cls=RootGroup,  # plugins' commands (register_commands) are found on demand
    help="Visual counterfactual explanations for image classifiers, and their evaluation.",
    no_args_is_help=True,
    add_completion=False,  # static scripts ship in completions/ (scripts/gen_completions.py)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cfx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Visual counterfactual explanations for image classifiers, and their evaluation."""


@app.command()
def explain(
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders (searched recursively).")],
    method: Annotated[str | None, typer.Option("--method", "-m", help="Explainer (see `cfx methods`).")] = None,
    target: Annotated[str | None, typer.Option(
        "--target", "-t", help="Target class name or index, or auto (most probable other class).")] = None,
    classifier: Annotated[str | None, typer.Option(
        "--classifier", "-c", help="Classifier spec (default: demo:digits).")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory (default cfx-runs/METHOD-TARGET).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Method hyperparameter KEY=VALUE (repeatable; see `cfx methods NAME`).")] = None,
    config: Annotated[str | None, typer.Option("--config", help="TOML file with these options and a [params] table.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Explain at most N inputs.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run; retries errors.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="Generative prior: demo:NAME, diffusers:PATH, adm:PATH.pt, i2sb:PATH.pt.")] = None,
    model_flags: Annotated[str | None, typer.Option("--model-flags", help="ADM MODEL_FLAGS string or flags file.")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="Class names, one per line.")] = None,
    region: Annotated[str | None, typer.Option("--region", help="Region allowed to change: auto (Integrated Gradients cells; --set region_area=0.3 region_cell=4), a mask image, a folder of masks, or SCHEME:ARG from a plugin.")] = None,
    mask: Annotated[str | None, typer.Option("--mask", help="Alias of --region FILE|DIR.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled checkpoints (runs their code).")] = False,
    executor: Annotated[str, typer.Option("--executor", help="local, or ray (distributed; needs the ray extra).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster address (default: start a local one).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Ray workers (actors), each loading the models once.")] = 2,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", help="GPUs reserved per Ray worker.")] = 0.0,
    shard: Annotated[str | None, typer.Option("--shard", help="Explain shard i of n (i/n, round-robin over the sorted inputs); combine with `cfx merge`.")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="Alias of --set tokens=FILE (TIME: the token file written by `cfx fit time`).")] = None,
    fit_data: Annotated[str | None, typer.Option("--fit-data", help="Alias of --set fit_data=DIR (TIME: fit the tokens now on this folder of training images).")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="N explanations per input, seeds SEED…SEED+N-1 (extra ones in RUN_DIR/seeds/K).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="Forward-only diffusion-network calls: auto (a validated `cfx accelerate` build if cached, else torch), torch, onnx or tensorrt.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16: forward-only calls on a copy of the network in that precision; calls the method takes gradients through under torch.autocast (each gated against fp32).")] = "fp32",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="torch: the forward-only calls, and the generative network a method differentiates, in channels_last memory format.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch: torch.compile the forward-only calls and the generative network a method differentiates (slow first batch).")] = False,
    compile_mode: Annotated[str, typer.Option("--compile-mode", help="With --compile: default, reduce-overhead (CUDA graphs) or max-autotune.")] = "default",
) -> None:
    """Explain every image: write counterfactuals and a manifest into a run directory."""
    from cfx_cli.explain.pipeline import run_explain, run_explain_seeds
    from cfx_cli.explain.request import ExplainRequest

    get_registry()  # one-line warnings for broken plugins, before any work
    cfg = load_config(config)
    known_cfg = {"method", "target", "classifier", "out", "batch_size", "seed", "device", "limit", "model",
                 "model_flags", "labels", "mask", "region", "params", "seeds"}
    unknown = set(cfg) - known_cfg
    if unknown:
        raise UsageError(f"--config {config}: unknown keys {', '.join(sorted(unknown))}")
    params = {k: v for k, v in (cfg.get("params") or {}).items()}
    params.update(parse_set_options(set_ or []))
    for flag, key, value in (("--tokens", "tokens", tokens), ("--fit-data", "fit_data", fit_data)):
        if value is not None:  # aliases of the method's own options (TIME declares them as parameters)
            if key in params and params[key] != value:
                raise UsageError(f"{flag} and --set {key}=... name the same option: give one")
            params[key] = value

    def pick(value, key, default=None):
        return value if value is not None else cfg.get(key, default)

    if region is not None and mask is not None and region != mask:
        raise UsageError("--region and --mask name the same option: give one")
    region = region if region is not None else mask
    method_name = pick(method, "method")
    if not method_name:
        raise UsageError("missing --method (see `cfx methods` for the installed explainers)")
    req = ExplainRequest(
        inputs=inputs, method=method_name, target=str(pick(target, "target", "auto")),
        classifier=pick(classifier, "classifier"), out=pick(out, "out"),
        batch_size=int(pick(batch_size, "batch_size", 8)), seed=int(pick(seed, "seed", 0)),
        device=pick(device, "device", "auto"), set_options=params, limit=pick(limit, "limit"),
        resume=resume, overwrite=overwrite, model=pick(model, "model"), model_flags=pick(model_flags, "model_flags"),
        labels_file=pick(labels, "labels"), trust_pickle=trust_pickle, mask=pick(region, "region", cfg.get("mask")),
        shard=shard, executor=executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
        options=RunOptions(backend=check_backend(backend), backend_precision=check_precision(precision),
                           channels_last=channels_last, compile=check_compile(compile_, compile_mode),
                           debug=debug_enabled()),
        seeds=int(pick(seeds, "seeds", 1)),
    )
    summaries = run_explain_seeds(req) if req.seeds != 1 else [run_explain(req)]
    for summary in summaries:
        c = summary.counts
        for err in summary.errors:
            typer.echo(f"error: {err}", err=True)
        resized = f", {summary.resized} resized >4× or cropped" if summary.resized else ""
        typer.echo(
            f"{sum(c.values())} inputs: {c['flipped']} flipped, {c['not_flipped']} not flipped, "
            f"{c['skipped']} skipped, {c['error']} errors{resized} ({summary.seconds:.1f}s) → {summary.run_dir}"
        )
    raise typer.Exit(max(s.exit_code for s in summaries))


@app.command("eval")
def eval_(
    run_dirs: Annotated[list[str], typer.Argument(help="Run directories written by `cfx explain`.")],
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma list of metrics, or all (default: the basic set).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")] = "table",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Metric option KEY=VALUE, e.g. inception_weights=PATH (see docs/metrics.md).")] = None,
    layout: Annotated[str, typer.Option("--layout", help="cfx (run directories) or ace (ACE/DiME folders).")] = "cfx",
) -> None:
    """Compute metrics for one or more runs, side by side; also saves each run's RUN_DIR/eval.json
    and rewrites its RUN_DIR/report.html to show them."""
    from cfx_cli.evaluate import evaluate, render, save_eval_json
    from cfx_cli.report import REPORT_NAME, write_run_report

    if fmt not in ("table", "json", "csv"):
        raise UsageError(f"--format {fmt!r}: expected table, json or csv")
    options = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    result = evaluate(run_dirs, metrics, device=resolve_device(device), options=options, layout=layout)
    for line in result.unfinished.values():  # metrics of a partial run describe only its finished part
        typer.echo(f"warning: {line}", err=True)
    saved, problems = save_eval_json(result, metrics)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    for run_dir in saved:  # the run's own page shows the metrics just saved
        if (run_dir / REPORT_NAME).is_file():
            write_run_report(run_dir, debug=debug_enabled())
    text = render(result, fmt)
    for run, reasons in result.skipped.items():
        for metric, reason in reasons.items():
            typer.echo(f"skipped {metric} for {run}: {reason}", err=True)
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text.rstrip("\n"))


@app.command()
def merge(
    run_dirs: Annotated[list[str], typer.Argument(help="Run directories to combine (e.g. the shards of one job).")],
    out: Annotated[str, typer.Option("--out", "-o", help="The merged run directory.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Combine runs of the same job (shards) into one run directory."""
    from cfx_cli.merge import merge_runs

    counts = merge_runs(run_dirs, out, overwrite=overwrite)
    from cfx_cli.report import write_run_report

    write_run_report(out, debug=debug_enabled())
    typer.echo(f"merged {len(run_dirs)} runs: {sum(counts.values())} records "
               f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) → {out}")


@app.command()
def report(
    run_dirs: Annotated[list[str], typer.Argument(
        help="Run directories; several are compared input by input.")],
    output: Annotated[str | None, typer.Option(
        "--output", "-o",
        help="HTML file to write (default RUN_DIR/report.html; required for several runs).")] = None,
) -> None:
    """Write the HTML gallery of a run (original | counterfactual | difference | overlay), or of
    several runs side by side. Shows RUN_DIR/eval.json when `cfx eval` saved one."""
    from cfx_cli.report import build_report

    path = build_report(run_dirs, output)
    typer.echo(f"wrote {path}")


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="Run directory written by `cfx explain`.")],
    out: Annotated[str, typer.Argument(help="Folder to write.")],
    layout: Annotated[str, typer.Option("--layout", help="Folder layout to write: ace (ACE/DiME evaluation scripts).")] = "ace",
    experiment: Annotated[str | None, typer.Option("--experiment", help="Results/EXP name (default: the method).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT/Results/EXP if it exists.")] = False,
) -> None:
    """Write a run in another tool's folder layout (ACE/DiME: Original/, Results/EXP/{CC,IC}/{CCF,ICF}/)."""
    from cfx_cli.export import export_ace

    if layout != "ace":
        raise UsageError(f"--layout {layout!r}: expected ace")
    exp_dir, n = export_ace(run_dir, out, experiment, overwrite)
    typer.echo(f"wrote {n} explanations → {exp_dir}")


@app.command()
def classify(
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders.")],
    classifier: Annotated[str | None, typer.Option("--classifier", "-c", help="Classifier spec (default: demo:digits).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    labels: Annotated[str | None, typer.Option("--labels", help="Class names, one per line.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle")] = False,
) -> None:
    """Classify images and print the label and probabilities of each."""
    if fmt not in ("table", "json"):
        raise UsageError(f"--format {fmt!r}: expected table or json")
    results, failed = classify_inputs(inputs, classifier, labels, device, batch_size, trust_pickle)
    if fmt == "json":
        typer.echo(json.dumps(results, indent=2))
    else:
        from rich.console import Console

        render_table(results, Console())
    raise typer.Exit(1 if failed else 0)


@app.command()
def serve(
    classifier: Annotated[str, typer.Option("--classifier", "-c", help="Classifier spec to serve.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port (0 picks a free one).")] = 8000,
    labels: Annotated[str | None, typer.Option("--labels", help="Class names, one per line.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow loading pickled checkpoints (runs their code).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not log one line per request.")] = False,
) -> None:
    """Serve a classifier over the HTTP protocol (set CFX_HTTP_TOKEN to require a bearer token)."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: expected 0-65535")
    serve_classifier(classifier, host, port, labels, device, trust_pickle, quiet=quiet)


@app.command()
def plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List installed plugins, their versions, what they register and load errors."""
    from dataclasses import asdict

    plugin_commands(ctx)  # so that each plugin's commands are listed
    reg = get_registry(warn=False)
    infos = sorted(reg.plugins.values(), key=lambda i: (not i.builtin, i.name))
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cfx plugins")
    for col in ("plugin", "distribution", "version", "provides", "status"):
        table.add_column(col)
    for i in infos:
        provides = ", ".join(
            [f"explainer {x}" for x in i.explainers] + [f"classifier {x}:" for x in i.classifier_adapters]
            + [f"metric {x}" for x in i.metrics] + [f"region {x}" + (":" if reg.region_sources[x][0].takes_arg else "") for x in i.region_sources]
            + [f"command {x}" for x in i.commands]
        )
        table.add_row(i.name, i.distribution + (" (built-in)" if i.builtin else ""), i.version,
                      provides or "–", f"error: {i.error}" if i.error else "ok")
    Console(width=160).print(table)


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="Show one method's parameters and presets.")] = None,
) -> None:
    """List explainers, or show one method's documented hyperparameters."""
    reg = get_registry()
    if name is None:
        for n, (cls, plugin) in sorted(reg.explainers.items()):
            kind = "white-box (needs gradients)" if "gradients" in cls.requires else "black-box"
            typer.echo(f"{n:12s} {kind:28s} {cls.summary}  [{plugin}]")
        return

    cls = get_explainer_class(name)
    typer.echo(f"{name}: {cls.summary}")
    if cls.description:
        typer.echo("")
        typer.echo(cls.description.strip())
    typer.echo("")
    typer.echo(f"requires: {', '.join(sorted(cls.requires)) or 'probabilities only (works black-box)'}")
    typer.echo("parameters (--set KEY=VALUE):")
    for p in cls.params:
        allowed = [f"one of {', '.join(show(c) for c in p.choices)}"] if p.choices else []
        allowed += [p.bounds()] if p.bounds() else []
        allowed_s = f" ({'; '.join(allowed)})" if allowed else ""
        typer.echo(f"  {p.name:16s} {p.kind:7s} default {show(p.default):10}  {p.help}{allowed_s}")
    if cls.presets:
        typer.echo("presets (--set preset=NAME):")
        for pname, values in cls.presets.items():
            typer.echo(f"  {pname:16s} " + ", ".join(f"{k}={show(v)}" for k, v in values.items()))


@app.command()
def metrics() -> None:
    """List the installed metrics and what each needs."""
    for n, (cls, plugin) in sorted(get_registry().metrics.items()):
        needs = ", ".join(sorted(cls.needs)) or "run directory only"
        default = "default" if cls.default else "opt-in"
        typer.echo(f"{n:18s} {default:8s} needs: {needs:24s} {cls.summary}  [{plugin}]")


@app.command()
def models(
    spec: Annotated[str | None, typer.Argument(help="Load this --model SPEC and describe it (a check).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    model_flags: Annotated[str | None, typer.Option("--model-flags", help="ADM MODEL_FLAGS or flags file.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "cpu",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow pickled checkpoints.")] = False,
) -> None:
    """List generative models (embedded demo ones, the papers' checkpoints, cached hub models) and cached hf: classifiers."""
    if spec:
        info = describe(load_model(spec, model_flags, resolve_device(device), trust_pickle), spec)
        typer.echo(json.dumps(info, indent=2) if as_json else
                   "\n".join(f"{k:12s} {v}" for k, v in info.items()))
        return
    data = collect()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(render_text(data))


@app.command()
def accelerate(
    model: Annotated[str, typer.Argument(help="Generative model spec (demo:pixel, diffusers:PATH, adm:PATH.pt).")],
    backend: Annotated[str, typer.Option("--backend", help="onnx or tensorrt (tensorrt: unverified, needs a GPU).")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help="fp32 or fp16.")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    size: Annotated[int | None, typer.Option("--size", help="Image size to build for (default: the model's).")] = None,
    model_flags: Annotated[str | None, typer.Option("--model-flags", help="ADM MODEL_FLAGS string or flags file.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled checkpoints (runs their code).")] = False,
) -> None:
    """Prebuild and validate an accelerated UNet for MODEL (export, cache, parity gate against torch)."""
    if backend not in ("onnx", "tensorrt"):
        raise UsageError(f"--backend {backend!r}: cfx accelerate builds onnx or tensorrt")
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision {precision!r}: expected fp32 or fp16")
    typer.echo(accelerate_model(model, backend, precision, device, size, model_flags, trust_pickle))


fit_app = typer.Typer(cls=FitGroup, no_args_is_help=True,
                      help="Learning stages of methods that have one (added by their plugins, e.g. `cfx fit time`); "
                           "each writes a reusable artifact.")
app.add_typer(fit_app, name="fit")


def main() -> None:
    """Entry point: one clear line for known errors (CFX_DEBUG=1 shows tracebacks)."""
    debug = debug_enabled()
    configure_cli_output()  # library chatter off (CFX_DEBUG=1 shows it), before anything imports a library
    try:
        app()  # standalone mode: usage errors exit 2 with click's message, --help exits 0
    except CfxError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (set CFX_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
