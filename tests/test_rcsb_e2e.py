"""RCSB end to end against the authors' code (../shared/fixtures/rcsb-e2e, README.md there): the schedule, every
intermediate of the guided sampler, the counterfactual and the automatic region, for every case in cases.json,
with the bridge loaded as a user loads it (``i2sb:bridge.safetensors`` + its ``bridge.json`` sidecar), the
fixture's classifier as a ``python:`` white-box classifier and the fixture's order-free noise."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fixture_dir
from safetensors.torch import load_file

from cfx_cli.attribution import TUNNEL_DRAW
from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.diffusion.noise import FunctionNoise, constant_noise
from cfx_cli.explainers import ExplainBatch, ExplainContext
from cfx_cli.images import InputImage
from cfx_cli.models import load_model
from cfx_cli.params import resolve_params
from cfx_plugins.explainers.rcsb import RCSB, RCSBTrace
from cfx_plugins.regions.auto import AutoRegion

BAR = 1e-4  # README "Tolerance": max abs in float32 on CPU
SCHEDULE = ("betas", "std_fwd", "std_bwd", "mu_x0", "mu_x1", "std_sb")


def _folder() -> Path:
    path = fixture_dir("rcsb-e2e")
    for line in (path / "SHA256SUMS").read_text().split("\n"):
        if line.strip():
            digest, name = line.split()
            assert hashlib.sha256((path / name.lstrip("*")).read_bytes()).hexdigest() == digest, name
    return path


def _cases() -> list[tuple[Path, dict, dict]]:
    """(folder, case, its tensors) for every case listed (a top-level case, or a ``cases`` list whose tensors are
    prefixed with the case name)."""
    path = _folder()
    data = json.loads((path / "cases.json").read_text())
    cases = data["cases"] if "cases" in data else [data]
    assert cases, "cases.json lists no case"
    out = []
    for case in cases:
        tensors = load_file(str(path / case.get("tensors", "tensors.safetensors")))
        prefix = f"{case.get('name', '')}_"
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out.append((path, case, tensors))
    return out


def _classifier(path: Path):
    spec = f"python:{path / 'classifier.py'}:build@{path / 'classifier.safetensors'}#size=32"
    return load_classifier(spec, ClassifierOptions(device="cpu"))


def _explainer(path: Path, case: dict, classifier=None, **extra) -> RCSB:
    paper = case["paper"]
    assert paper["ot_ode"] and paper["tweedie"] and paper["adaptive_normalization"]
    values = {"scale": paper["s"], "tau": paper["tau"], "nfe": paper["N_nfe"], "beta1": paper["adam"]["beta1"],
              "beta2": paper["adam"]["beta2"], "eps": paper["adam"]["eps"], **extra}
    params = resolve_params("rcsb", RCSB.params, RCSB.presets, values)
    ctx = ExplainContext(classifier=classifier or _classifier(path), params=params, device="cpu",
                         model=f"i2sb:{path / 'bridge.safetensors'}", noise=constant_noise(case["noise"]["seed"]))
    return RCSB(ctx)


def _batch(t: dict, images=None, masks=None, targets=None) -> ExplainBatch:
    images = t["input"] if images is None else images
    n = len(images)
    return ExplainBatch(ids=[f"i{k}" for k in range(n)], images=images,
                        targets=t["target"] if targets is None else targets,
                        sources=torch.zeros(n, dtype=torch.long), seeds=list(range(n)),
                        masks=t["region"] if masks is None else masks)


def _close(name: str, got, want, bar: float = BAR, relative: bool = False) -> None:
    got, want = got.float(), want.float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = float((got - want).abs().max())
    if relative:
        diff /= float(want.abs().max())
    assert diff <= bar, f"{name}: max {'relative' if relative else 'abs'} difference {diff:.2e} > {bar:g}"


def _tunnel_noise() -> FunctionNoise:
    """The README's noise-tunnel draws: sample k = randn((3, H, W), generator seeded 1000 + k)."""

    def fn(draw, shape):
        assert draw.name == TUNNEL_DRAW, draw
        return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + draw.index[0]))

    return FunctionNoise(fn)


def _region_source(case: dict) -> AutoRegion:
    ig, paper = case["ig"], case["paper"]
    assert ig["method"] == "gausslegendre" and ig["baselines"] == "zeros" and ig["sign"] == "absolute_value"
    options = {"region_area": paper["a"], "region_cell": paper["c"], "region_steps": ig["n_steps"],
               "region_samples": ig["nt_samples"], "region_noise": ig["stdevs"],
               "region_clip": 100.0 - ig["outlier_perc"]}
    assert {k: AutoRegion.option_defaults[k] for k in ("region_steps", "region_samples", "region_noise",
                                                       "region_clip")} == {k: options[k] for k in (
        "region_steps", "region_samples", "region_noise", "region_clip")}, "cfx's defaults are the authors'"
    return AutoRegion("", options, noise=_tunnel_noise())


def test_rcsb_e2e_schedule_and_steps():
    for path, case, _ in _cases():
        _check_schedule(path, case)


def _check_schedule(path: Path, case: dict) -> None:
    sched = load_file(str(path / "schedule.safetensors"))
    model = load_model(f"i2sb:{path / 'bridge.safetensors'}", device="cpu", expect="bridge")
    br = model.bridge
    assert model.options["beta_max"] == case["paper"]["beta_max"]
    for name in SCHEDULE:
        _close(name, getattr(br, name), sched[name], 1e-10, relative=True)
    assert br.noise_levels.dtype == torch.float32 and torch.equal(br.noise_levels, sched["noise_levels"])
    assert float(br.network_time(case["q_sample_step"])) == case["network_time_first_step"]
    expl = _explainer(path, case)
    assert expl.first_step == case["q_sample_step"] == case["config_keys"]["inpainter.subconfig.start_step"] - 1
    nfe = case["paper"]["N_nfe"]
    assert br.sampling_steps(nfe, expl.first_step)[::-1] == case["steps_desc"]
    # the code's start_step is round(τ·T), the first step start_step − 1 (also at half-integers of τ·(T − 1))
    T = br.interval
    assert [br.truncation_step(tau) for tau in (0.5, 0.7, 1.0)] == [T // 2 - 1, round(0.7 * T) - 1, T - 1]


def test_rcsb_e2e_sampler_matches_every_intermediate():
    for path, case, t in _cases():
        clf = _classifier(path)
        calls = {"classifier": 0}
        logits = clf.logits

        def counted(x, _logits=logits, _calls=calls):
            _calls["classifier"] += 1
            return _logits(x)

        clf.logits = counted
        expl = _explainer(path, case, classifier=clf)
        net_calls: list[int] = []
        hook = expl.model.net.register_forward_hook(lambda *a, _calls=net_calls: _calls.append(1))
        try:
            trace = RCSBTrace()
            out = expl.explain(_batch(t), trace=trace)
        finally:
            hook.remove()
        nfe = case["paper"]["N_nfe"]
        assert trace.steps == case["steps_desc"]
        assert len(net_calls) == case["counts"]["network_forward"] == nfe
        assert calls["classifier"] == case["counts"]["classifier_forward"] == nfe
        _close("x1", trace.x1, t["x1"])
        _close("x_start", trace.x_start, t["x_start"])
        _close("first_x0hat", trace.x0hat[0], t["first_x0hat"])
        _close("first_clf_input", trace.clf_input[0], t["first_clf_input"])
        _close("first_grad", trace.grad[0], t["first_grad"], relative=True)
        _close("first_grad_adam", trace.grad_adam[0], t["first_grad_adam"], 1e-3)
        _close("first_norm", trace.norm, t["first_norm"], relative=True)
        _close("first_update", trace.update[0], t["first_update"])
        _close("second_update", trace.update[1], t["second_update"])
        _close("traj_xt", torch.stack(trace.xt, 1), t["traj_xt"])
        _close("traj_x0hat", torch.stack(trace.x0hat, 1), t["traj_x0hat"])
        _close("final_xt", trace.xt[-1], t["final_xt"])
        cf = torch.stack([o.counterfactual for o in out])
        _close("counterfactual", cf, t["counterfactual"])
        # outside R the counterfactual is the input bit for bit (the code: up to [-1, 1] rounding)
        outside = t["region"].expand_as(cf) < 0.5
        assert torch.equal(cf[outside], t["input"][outside])
        with torch.no_grad():
            _close("logits_counterfactual", logits(cf), t["logits_counterfactual"])
            flipped = (logits(cf).argmax(1) == t["target"]).tolist()
        assert flipped == case["results"]["flipped"]


def test_rcsb_e2e_region_extraction_through_cfx_region_source():
    for path, case, t in _cases():
        clf = _classifier(path)
        src = _region_source(case)
        n = len(t["input"])
        trace = src.extract([f"i{k}" for k in range(n)], t["input"], clf)
        assert torch.equal(trace.target, t["ig_target"])
        _close("ig_attr", trace.attr, t["ig_attr"], 1e-6)
        _close("ig_heat", trace.heat, t["ig_heat"])
        _close("ig_cells", trace.cells, t["ig_cells"])
        assert torch.equal(trace.region, t["ig_region"].float()), "ig_region differs"
        assert trace.region.flatten(1).mean(1).tolist() == case["region_area"]
        if case.get("region_equals_ig_region"):
            assert torch.equal(t["region"][:, 0], t["ig_region"].float())
        # the same mask through the path the pipeline calls (one input at a time, an (H, W, 3) array)
        for k in range(n):
            item = InputImage(id=f"i{k}", path=path / "tensors.safetensors")
            mask = src.mask_for(item, tuple(t["input"].shape[-2:]), image=t["input"][k].permute(1, 2, 0).numpy(),
                                classifier=clf)
            assert (mask == t["ig_region"][k].numpy()).all()
        # the noise tunnel is the README's draws, 0.05·randn(seed 1000 + k)
        noise = t["ig_noise"]
        assert torch.allclose(torch.stack([case["ig"]["stdevs"] * torch.randn(
            noise.shape[1:], generator=torch.Generator().manual_seed(1000 + k)) for k in range(len(noise))]), noise)


def test_rcsb_e2e_captum_computes_the_same_attribution():
    pytest.importorskip("captum")
    from cfx_cli.attribution import integrated_gradients, tunnel_draws

    for path, case, t in _cases():
        clf = _classifier(path)
        n = len(t["input"])
        draws = _tunnel_noise().for_batch([f"i{k}" for k in range(n)], list(range(n)), "cpu")
        tunnel = tunnel_draws(draws, n, tuple(t["input"].shape[1:]), case["ig"]["nt_samples"], case["ig"]["stdevs"])
        theirs = integrated_gradients(clf, t["input"], target=t["ig_target"], tunnel=tunnel, use_captum=True)
        _close("captum ig_attr", theirs, t["ig_attr"], 1e-6)


@pytest.mark.slow  # ~5–15 s on the shared 2-core machine
def test_rcsb_e2e_results_do_not_depend_on_the_batch():
    for path, case, t in _cases():
        clf = _classifier(path)
        expl = _explainer(path, case, classifier=clf)
        alone_trace = RCSBTrace()
        alone = expl.explain(_batch(t), trace=alone_trace)
        n = len(t["input"])
        # another image, with another region and target, before the case's
        other = (1 - t["input"].flip(-1)).clamp(0.2, 1)
        other_mask = 1 - t["region"]
        images, masks = torch.cat([other, t["input"]]), torch.cat([other_mask, t["region"]])
        targets = torch.cat([1 - t["target"], t["target"]])
        trace = RCSBTrace()
        both = expl.explain(_batch(t, images, masks, targets), trace=trace)
        for k in range(n):
            # equal up to the float rounding of a batch of another size (≈1e-6), far below the bar
            torch.testing.assert_close(both[n + k].counterfactual, alone[k].counterfactual, atol=1e-5, rtol=0)
            torch.testing.assert_close(trace.update[0][n + k], alone_trace.update[0][k], atol=1e-5, rtol=0)
            _close("counterfactual in a batch", both[n + k].counterfactual[None], t["counterfactual"][k:k + 1])
        # the region source too: the case's region inside a batch with the other image
        src = _region_source(case)
        region = src.extract([f"o{k}" for k in range(n)] + [f"i{k}" for k in range(n)], images, clf).region
        assert torch.equal(region[n:], t["ig_region"].float())


def test_rcsb_parity_minmax_view_is_per_image():
    """The code min–max maps the whole batch as soon as one image has a negative minimum; cfx maps each image
    with a negative minimum, so an image's view never depends on the others (identical for B = 1)."""
    from cfx_plugins.explainers.rcsb import minmax01

    g = torch.Generator().manual_seed(0)
    negative = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    positive = torch.rand(1, 3, 4, 4, generator=g) * 0.5 + 0.1
    both = minmax01(torch.cat([negative, positive]))
    assert torch.equal(both[:1], minmax01(negative)) and torch.equal(both[1:], positive)
    expected = (negative - negative.min()) / (negative - negative.min()).max()
    assert torch.allclose(both[0], expected[0]) and float(both[0].min()) == 0.0 and float(both[0].max()) == 1.0


def test_rcsb_e2e_earlier_variants_are_options_and_differ():
    """cfx's earlier sampler (--set clf_view=paste --set mask_grad=true) stays available: Adam and the norm on R⊙g
    make the first step ≈ 1/√a larger inside R (Adam's first output is ±1), and the result moves."""
    for path, case, t in _cases():
        clf = _classifier(path)
        old_trace = RCSBTrace()
        old = _explainer(path, case, classifier=clf, clf_view="paste", mask_grad=True).explain(_batch(t),
                                                                                             trace=old_trace)
        inside = t["region"].expand_as(t["input"]) > 0.5
        area = float(t["region"].mean())
        ratio = float(old_trace.update[0][inside].abs().mean() / t["first_update"][inside].abs().mean())
        assert abs(ratio * area**0.5 - 1) < 0.02, ratio
        assert float(old_trace.update[0][~inside].abs().max()) == 0.0
        cf = torch.stack([o.counterfactual for o in old])
        assert float((cf - t["counterfactual"]).abs().max()) > 1e-2
        # the float32 state moves the result only by rounding (README: about 4e-6)
        f32 = _explainer(path, case, classifier=clf, float64=False).explain(_batch(t))
        _close("float32 state", torch.stack([o.counterfactual for o in f32]), t["counterfactual"])


@pytest.mark.slow  # ~5–15 s on the shared 2-core machine
def test_rcsb_e2e_beta_max_default_is_the_authors_unless_declared(tmp_path):
    path = _folder()
    sidecar = json.loads((path / "bridge.json").read_text())
    shutil.copy(path / "bridge.safetensors", tmp_path / "bridge.safetensors")
    undeclared = {k: v for k, v in sidecar.items() if k != "beta_max"}
    (tmp_path / "bridge.json").write_text(json.dumps(undeclared))
    model = load_model(f"i2sb:{tmp_path / 'bridge.safetensors'}", device="cpu", expect="bridge")
    assert model.options["beta_max"] == 1.0 and model.info["beta_max_from"].startswith("default")
    sched = load_file(str(path / "schedule.safetensors"))
    _close("std_fwd (default beta_max)", model.bridge.std_fwd, sched["std_fwd"], 1e-10, relative=True)
    (tmp_path / "bridge.json").write_text(json.dumps({**undeclared, "beta_max": 0.3}))
    declared = load_model(f"i2sb:{tmp_path / 'bridge.safetensors'}", device="cpu", expect="bridge")
    assert declared.options["beta_max"] == 0.3 and declared.info["beta_max_from"].endswith("bridge.json")
    # the demo bridge was trained with 0.3 and declares it
    assert load_model("demo:bridge", device="cpu").options["beta_max"] == 0.3
