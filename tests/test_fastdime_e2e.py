"""FastDiME end to end against the authors' code (tests/fixtures/fastdime-e2e, made by
scripts/make_fastdime_fixture.py): every case of cases.json (the variants fastdime, fastdime2, fastdime2+) run
through cfx's ADM loader, a white-box classifier and ``constant_noise``; z_τ, the traced steps, every pass's output
and mask, each attempt, the final counterfactual, the saved mask and the network-evaluation counts match within
the fixture's tolerance (masks exactly), and an image's numbers do not depend on the images it shares a batch
with. Plus the embedded demo through the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_dir, run_cfx

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from test_dime_e2e import SingleLogitClassifier, maxdiff, traced_run  # noqa: E402

from cfx_cli.diffusion.noise import Draw, constant_noise  # noqa: E402
from cfx_cli.explainers import ExplainBatch, ExplainContext  # noqa: E402
from cfx_cli.params import resolve_params  # noqa: E402
from cfx_cli.plugins import get_explainer_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).parent / "fixtures" / "fastdime-e2e"  # committed with the tests
VARIANT = {"fastdime": "fastdime", "fastdime2": "fastdime2", "fastdime2+": "fastdime2+",
           "fastdimenomask": "nomask"}  # the authors' --method → cfx's variant


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file

    meta = json.loads((ROOT / "cases.json").read_text())
    spec = importlib.util.spec_from_file_location("fastdime_e2e_classifier", ROOT / "classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.build()
    net.load_state_dict(load_file(str(ROOT / "classifier.safetensors")))
    net.eval().requires_grad_(False)
    return {"meta": meta, "tensors": load_file(str(ROOT / "tensors.safetensors")), "net": net,
            "adm": fixture_dir("adm-unet")}


def settings(case: dict) -> dict[str, str]:
    """The authors' main.py flags of a case as cfx ``--set`` values; a flag cfx does not map fails here."""
    f = case["cli_flags"]
    assert f["l2_loss"] == 0 and not f["use_ddim"] and f["self_optimized_masking"], case["name"]
    assert f["guided_iterations"] >= f["start_step"], case["name"]  # every step guided
    return {"variant": VARIANT[case["method"]], "tau": str(f["start_step"]),
            "respacing": str(f["timestep_respacing"]), "scales": str(f["classifier_scales"]),
            "loss": "logits" if f["use_logits"] else "ce", "lambda_1": str(f["l1_loss"]),
            "lambda_p": str(f["l_perc"]), "perc_layer": str(f["l_perc_layer"]), "warmup": str(f["warmup_step"]),
            "dilation": str(f["dilation"]), "threshold": str(f["masking_threshold"]),
            "scale_grads": str(f["scale_grads"]), "clip_denoised": str(f["clip_denoised"])}


def make(fx, case: dict):
    cls = get_explainer_class("fastdime")
    params = resolve_params("fastdime", cls.params, cls.presets, settings(case))
    net = fx["meta"]["network"]
    flags = json.loads((fx["adm"] / "configs.json").read_text())[net["config"]]["flags"]
    flags = {**flags, "diffusion_steps": case["cli_flags"]["diffusion_steps"],
             "noise_schedule": case["cli_flags"]["noise_schedule"]}
    clf = SingleLogitClassifier(fx["net"])
    ctx = ExplainContext(classifier=clf, params=params, model=f"adm:{fx['adm'] / (net['config'] + '.pt')}",
                         model_flags=" ".join(f"--{k} {v}" for k, v in flags.items()),
                         noise=constant_noise(case["noise_seed"]))
    return cls(ctx), clf


def run(fx, case: dict, x, targets):
    """cfx's FastDiME on images ``x`` ([-1, 1]) with the case's settings: (outputs, trace events, counts)."""
    return traced_run(*make(fx, case), x, targets)


def picked(event: dict, key: str, pos: dict[int, int], n: int, fill=float("nan")):
    """The rows of a traced tensor that belong to the case, at the case's row positions (``fill`` elsewhere)."""
    v = event[key]
    out = torch.full((n, *v.shape[1:]), fill, dtype=torch.float32)
    for i, r in enumerate(event["rows"]):
        if r in pos:
            out[pos[r]] = v[i].float()
    return out


def check_case(fx, case: dict, outs, events, rows: list[int]) -> None:
    k, t = case["name"], fx["tensors"]
    tol = fx["meta"]["tolerance"]["float_max_abs"]
    pos = {r: j for j, r in enumerate(rows)}
    n = len(rows)
    (z_tau,) = [d for e, d in events if e == "z_tau"]
    assert maxdiff(z_tau["z_tau"][rows], t[f"{k}_z_tau"]) <= tol, k
    two_pass = "2" in case["method"]
    n_ref = len(case["observed"]["attempts"])
    attempts = {d["attempt"]: d for e, d in events if e == "attempt"}
    assert sorted(attempts) == list(range(1, n_ref + 1)), f"{k}: cfx ran attempts {sorted(attempts)}"
    for j in range(n_ref):
        ref_flipped = t[f"{k}_attempt{j}_flipped"]
        took_part = [f for f in range(n) if int(ref_flipped[f]) >= 0]
        att = attempts[j + 1]
        assert sorted(pos[r] for r in att["rows"] if r in pos) == took_part, f"{k} attempt {j}: images"
        for p in range(2 if two_pass else 1):
            pre = f"{k}_attempt{j}_pass{p}"
            (ev,) = [d for e, d in events if e == "pass" and d["attempt"] == j + 1 and d["pass_"] == p]
            assert maxdiff(picked(ev, "z0", pos, n), t[f"{pre}_cf"]) <= tol, f"{pre}: output"
            if f"{pre}_keep" in t:  # the mask: exactly the authors' boolmask
                assert ev["keep"] is not None, f"{pre}: cfx set no mask"
                ref = t[f"{pre}_keep"].float()
                got = picked(ev, "keep", pos, n, -1.0)
                assert torch.equal(got[took_part], ref[took_part]), f"{pre}: keep mask"
            else:
                assert ev["keep"] is None, f"{pre}: the authors set no mask here"
            steps = [d for e, d in events if e == "step" and d["attempt"] == j + 1 and d["pass_"] == p]
            tau = int(case["cli_flags"]["start_step"])
            assert [s["t"] for s in steps] == list(range(tau - 1, -1, -1)), pre
            for name in t:
                if name.startswith(f"{pre}_z_step") or name.startswith(f"{pre}_x_step"):
                    s = int(name.rsplit("_step", 1)[1])
                    key = "z" if "_z_step" in name else "x_t"
                    assert maxdiff(picked(steps[s], key, pos, n), t[name]) <= tol, name
        score = att["logits"][:, 1] - att["logits"][:, 0]
        logit = picked({"rows": att["rows"], "s": score[:, None]}, "s", pos, n)[:, 0]
        assert maxdiff(logit, t[f"{k}_attempt{j}_logit"]) <= tol, f"{k} attempt {j}: logit"
        for i, r in enumerate(att["rows"]):
            if r in pos:
                assert int(att["flipped"][i]) == int(ref_flipped[pos[r]]), f"{k} attempt {j}: flipped"
    last_pass = 1 if two_pass else 0
    for f in range(n):
        out = outs[rows[f]]
        ref_attempt = int(t[f"{k}_attempt_of_cf"][f])
        assert out.params["attempt"] == ref_attempt + 1, f"{k}: attempt_of_cf (image {f})"
        cf_ref = t[f"{k}_cf"][f]
        assert float((out.counterfactual - ((cf_ref + 1) / 2).clamp(0, 1)).abs().max()) <= tol, f"{k}: cf"
        att = attempts[ref_attempt + 1]
        i = att["rows"].index(rows[f])
        assert abs(float(att["logits"][i, 1] - att["logits"][i, 0]) - float(t[f"{k}_logit_cf"][f])) <= tol, k
        assert int(att["flipped"][i]) == int(t[f"{k}_flipped"][f]), f"{k}: flipped"
        # the mask saved in masks/: where the image was allowed to change = 1 − the authors' final boolmask
        keep = t.get(f"{k}_attempt{ref_attempt}_pass{last_pass}_keep")
        if keep is None:
            assert out.mask is None, k
        else:
            assert out.mask is not None and torch.equal(out.mask.float().cpu(), 1 - keep[f].float()), f"{k}: mask"


def cases(fx) -> list[dict]:
    listed = fx["meta"]["cases"]
    assert listed, "cases.json lists no case"
    return listed


def case_inputs(fx, case):
    t = fx["tensors"]
    return t[f"{case['name']}_x"], t[f"{case['name']}_target"]


def test_fastdime_e2e_every_case_matches_the_authors_code(fx):
    variants = set()
    for case in cases(fx):
        k = case["name"]
        x, target = case_inputs(fx, case)
        with torch.no_grad():
            logit_x = fx["net"](x)
        assert maxdiff(logit_x, fx["tensors"][f"{k}_logit_x"]) <= 1e-4, k
        assert torch.equal((logit_x <= 0).long(), target), k
        outs, events, counts = run(fx, case, x, target)
        check_case(fx, case, outs, events, list(range(x.shape[0])))
        obs = case["observed"]
        assert counts["unet"] == obs["unet_evaluations"]["images"], k
        assert counts["clf_grad"] == obs["classifier_gradient_calls"], k
        assert sum(o.params["nfe_model"] for o in outs) == counts["unet"], k
        assert sum(o.params["nfe_classifier"] for o in outs) == counts["clf_grad"], k
        assert sum(o.nfe for o in outs) == counts["unet"] + counts["clf_grad"], k
        variants.add(case["method"])
    assert {"fastdime", "fastdime2", "fastdime2+"} <= variants  # every published variant has a case


@pytest.mark.slow  # ~30 s on the shared 2-core machine
def test_fastdime_e2e_results_do_not_depend_on_the_batch(fx):
    """Each case's image after every other case's images in one batch, with the case's settings: its rows still
    match the reference, and the other rows equal those images run alone."""
    listed = cases(fx)
    for case in listed:
        x, target = case_inputs(fx, case)
        others = [case_inputs(fx, c) for c in listed if c is not case] or [(x, target)]
        ox, ot = torch.cat([o[0] for o in others]), torch.cat([o[1] for o in others])
        outs, events, _ = run(fx, case, torch.cat([ox, x]), torch.cat([ot, target]))
        check_case(fx, case, outs, events, list(range(ox.shape[0], ox.shape[0] + x.shape[0])))
        alone, _, _ = run(fx, case, ox, ot)
        for i in range(ox.shape[0]):
            assert outs[i].params["attempt"] == alone[i].params["attempt"], case["name"]
            diff = float((outs[i].counterfactual - alone[i].counterfactual).abs().max())
            assert diff <= fx["meta"]["tolerance"]["float_max_abs"], (case["name"], i, diff)
            assert torch.equal(outs[i].mask, alone[i].mask), (case["name"], i)


def test_fastdime_e2e_bar_discriminates(fx):
    """The choices the docs page records are measurable on the fixture: dividing by √ᾱ_t (DiME's scaling), or
    one more warm-up step, moves the output far beyond the bar."""
    case = cases(fx)[0]
    x, target = case_inputs(fx, case)
    ref = fx["tensors"][f"{case['name']}_attempt0_pass0_cf"]
    for key, value in (("scale_grads", "True"), ("warmup", str(case["cli_flags"]["warmup_step"] + 1))):
        cls = get_explainer_class("fastdime")
        params = resolve_params("fastdime", cls.params, cls.presets, {**settings(case), key: value})
        exp, _ = make(fx, case)
        exp.params = params
        events: list = []
        exp.trace = lambda event, _log=events, **data: _log.append((event, data))
        exp.explain(ExplainBatch(ids=["a"], images=(x + 1) / 2, targets=target, sources=1 - target, seeds=[0]))
        (ev,) = [d for e, d in events if e == "pass" and d["attempt"] == 1 and d["pass_"] == 0]
        assert maxdiff(ev["z0"], ref) > 1e-2, key


def test_fastdime_e2e_fixture_is_complete(fx):
    assert fx["meta"]["code"]["commit"] and fx["meta"]["network"]["fixture"] == "adm-unet"
    for case in cases(fx):
        k = case["name"]
        for name in ("x", "target", "z_tau", "cf", "attempt_of_cf", "flipped", "logit_cf", "noise"):
            assert f"{k}_{name}" in fx["tensors"], f"{k}_{name}"
        assert set(case["tensors"]) <= set(fx["tensors"]), k
        noise = constant_noise(case["noise_seed"]).fn
        ref = fx["tensors"][f"{k}_noise"]
        assert torch.equal(noise(Draw("a", 0, "z_tau"), tuple(ref.shape)), ref), k
        # the masks are non-trivial: some pixels kept and some edited, so exact equality means something
        for name in case["tensors"]:
            if name.endswith("_keep"):
                m = fx["tensors"][name].float()
                m = m[m >= 0]
                assert 0 < float(m.mean()) < 1, name


def test_fastdime_demo_runs_and_saves_masks(tmp_path, demo_images):
    """The embedded demo through the CLI (digits preset, cut down): two counterfactuals, each with its mask in
    masks/ (the self-optimised one: values 0/1, some pixels kept), the NFE of 1 network call + 1 gradient per
    step and attempt in the manifest."""
    from PIL import Image

    out = tmp_path / "run"
    res = run_cfx("explain", str(demo_images), "--method", "fastdime", "--limit", "2", "--out", str(out),
                  "--set", "tau=6", "--set", "warmup=2", "--set", "scales=20", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert rec["mask"], rec
        mask = np.asarray(Image.open(out / rec["mask"]).convert("L"))
        assert set(np.unique(mask)) <= {0, 255} and 0 < (mask == 0).mean() < 1, rec["mask"]
        assert rec["nfe"] == 6 + 6, rec
        assert rec["params"]["variant"] == "fastdime" and rec["params"]["nfe_model"] == 6


def test_fastdime_region_combines_with_the_self_optimised_mask(fx):
    """With a region R (--region/--mask) the saved mask (where the image may change) lies inside R and is not all
    of R (the self-optimised mask keeps part of it), and wherever the mask is 0 the output is the input."""
    case = cases(fx)[0]
    x, target = case_inputs(fx, case)
    exp, _ = make(fx, case)
    region = torch.zeros(1, 1, 32, 32)
    region[..., 4:28, 2:20] = 1
    out = exp.explain(ExplainBatch(ids=["a"], images=(x + 1) / 2, targets=target, sources=1 - target, seeds=[0],
                                   masks=region))[0]
    assert out.mask is not None
    assert float((out.mask * (1 - region[0])).abs().max()) == 0.0  # changes only inside the region
    assert 0 < float(out.mask.sum()) < float(region.sum())  # the self-optimised mask keeps part of the region
    kept = (out.mask == 0).expand(3, -1, -1)
    assert float((out.counterfactual - (x[0] + 1) / 2)[kept].abs().max()) <= 1e-6


def test_fastdime_bad_settings_are_one_line_usage_errors(fx):
    from cfx_cli.errors import UsageError

    case = cases(fx)[0]
    cls = get_explainer_class("fastdime")
    for key, value, match in (("dilation", "4", r"^fastdime: --set dilation=4: must be odd"),
                              ("tau", "25", r"^fastdime: --set tau=25 exceeds the 25 steps"),
                              ("variant", "fast", r"variant='fast': must be one of")):
        with pytest.raises(UsageError, match=match):
            params = resolve_params("fastdime", cls.params, cls.presets, {**settings(case), key: value})
            net = fx["meta"]["network"]
            cls(ExplainContext(classifier=SingleLogitClassifier(fx["net"]), params=params,
                               model=f"adm:{fx['adm'] / (net['config'] + '.pt')}",
                               model_flags=make(fx, case)[0].context.model_flags))


# measured on the 16 README digits with the digits presets (seed 0): 16/16 flipped by both; oracle DiME 72 % (mlp 75 %,
# rff 69 %), FastDiME 88 % (both 88 %). The former presets (20 of 100 steps, no guide, λ_1 0.05) also flip all 16
# but the judges read only 41 % / 44 % of them as the target. The bars leave one digit of slack.
DEMO_PRESET = {"dime": {"respacing": "80", "guide_cone": 60.0, "lambda_1": 0.15, "oracle": 0.65},
               "fastdime": {"respacing": "85", "guide_cone": 45.0, "lambda_1": 0.05, "oracle": 0.8}}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(DEMO_PRESET))
def test_digits_preset_edits_are_read_as_the_target_by_the_judges(tmp_path, demo_images, method):
    """Issue 22: with demo:digits the digits preset applies (tuned on the tuning split: τ = 20 of 80 / 85 respaced
    steps, robust guidance by demo:digits-robust), and the counterfactuals of the 16 README digits flip the CNN and
    are read as the target by the independent judges, not only by the CNN."""
    want = DEMO_PRESET[method]
    out = tmp_path / "run"
    res = run_cfx("explain", str(demo_images), "--method", method, "--target", "auto", "--seed", "0", "--out",
                  str(out), "--device", "cpu", env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert res.returncode in (0, 1), res.stderr
    params = json.loads((out / "run.json").read_text())["parameters"]
    assert params["guide"] == "demo:digits-robust" and params["guide_cone"] == want["guide_cone"]
    assert params["guide_rule"] == "code"  # the rule it was tuned with (inside the cone: the CNN's own gradient)
    assert params["respacing"] == want["respacing"] and params["tau"] == 20 and params["lambda_1"] == want["lambda_1"]
    ev = run_cfx("eval", str(out), "--metrics", "flip_rate,oracle_flip_rate", "--format", "json",
                 env={"CFX_ORACLE": "", "CFX_FLIP_ORACLES": ""})
    assert ev.returncode == 0, ev.stderr
    row = json.loads(ev.stdout)["runs"][0]
    assert row["flipped"] == 16, row
    assert row["oracle_flip_rate"] >= want["oracle"], row
    assert min(row["oracle_flip_rate_mlp"], row["oracle_flip_rate_rff"]) >= want["oracle"] - 0.1, row
