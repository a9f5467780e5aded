"""DiME end to end against the authors' code (../shared/fixtures/dime-e2e): every case of cases.json, run through
cfx's own ADM loader (``--model adm:PATH --model-flags …``), a white-box classifier and ``constant_noise``; z_τ,
every step's z/x_t, each attempt, the final counterfactual and the network-evaluation counts match within the
fixture's tolerance, and an image's numbers do not depend on the images it shares a batch with."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import fixture_dir

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from cfx_cli.classifiers import Classifier  # noqa: E402
from cfx_cli.diffusion.noise import Draw, constant_noise  # noqa: E402
from cfx_cli.explainers import ExplainBatch, ExplainContext  # noqa: E402
from cfx_cli.params import resolve_params  # noqa: E402
from cfx_cli.plugins import get_explainer_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SingleLogitClassifier(Classifier):
    """The fixture's single-logit model (input [-1, 1], output (B,)) as a cfx white-box classifier on [0, 1]
    images with the 2 logits (0, l) (``split=True``: (−l/2, l/2)): class 1 ⇔ l > 0, as the authors'
    ``logit > 0``."""

    labels = ["0", "1"]
    capabilities = frozenset({"probabilities", "gradients"})
    spec = "dime-e2e classifier"

    def __init__(self, net, split: bool = False) -> None:
        self.net = net
        self.split = split
        self.calls = 0
        self.gradient_calls = 0  # images whose logits were computed with autograd on

    def logits(self, images):
        self.calls += images.shape[0]
        if torch.is_grad_enabled():
            self.gradient_calls += images.shape[0]
        logit = self.net(images * 2 - 1)
        if self.split:
            return torch.stack([-logit / 2, logit / 2], dim=1)
        return torch.stack([torch.zeros_like(logit), logit], dim=1)

    def predict_proba(self, images):
        with torch.no_grad():
            return torch.softmax(self.logits(images), dim=1).cpu()


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file

    root = fixture_dir("dime-e2e")
    adm = fixture_dir("adm-unet")
    meta = json.loads((root / "cases.json").read_text())
    spec = importlib.util.spec_from_file_location("dime_e2e_classifier", root / "classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.build()
    net.load_state_dict(load_file(str(root / "classifier.safetensors")))
    net.eval().requires_grad_(False)
    return {"meta": meta, "tensors": load_file(str(root / "tensors.safetensors")), "net": net, "adm": adm}


def dime_settings(case: dict) -> dict[str, str]:
    """The authors' main.py flags of a case as cfx ``--set`` values; a flag cfx does not map fails here."""
    f = case["cli_flags"]
    assert f["l2_loss"] == 0 and not f["use_ddim"] and f["sampling_scale"] == 1.0, case["name"]
    assert f["guided_iterations"] >= f["start_step"], case["name"]  # every step guided
    return {"tau": str(f["start_step"]), "respacing": str(f["timestep_respacing"]),
            "scales": str(f["classifier_scales"]), "loss": "logits" if f["use_logits"] else "ce",
            "lambda_1": str(f["l1_loss"]), "lambda_p": str(f["l_perc"]), "perc_layer": str(f["l_perc_layer"]),
            "stochastic_x": str(f["use_sampling_on_x_t"]), "clip_denoised": str(f["clip_denoised"])}


def model_flags(case: dict) -> str:
    """MODEL_FLAGS + the diffusion flags, as a user passes them to --model-flags."""
    unet = case["hyperparameters"]["unet"]
    flags = {**unet["flags"], "diffusion_steps": case["cli_flags"]["diffusion_steps"],
             "noise_schedule": case["cli_flags"]["noise_schedule"]}
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def make_dime(fx, case: dict, clf: SingleLogitClassifier | None = None, **overrides: str):
    cls = get_explainer_class("dime")
    params = resolve_params("dime", cls.params, cls.presets, {**dime_settings(case), **overrides})
    unet = case["hyperparameters"]["unet"]
    assert unet["fixture"] == "adm-unet", case["name"]
    clf = clf or SingleLogitClassifier(fx["net"])
    ctx = ExplainContext(classifier=clf, params=params, model=f"adm:{fx['adm'] / (unet['config'] + '.pt')}",
                         model_flags=model_flags(case), noise=constant_noise(case["noise_seed"]))
    return cls(ctx), clf


def run(fx, case: dict, x, targets):
    """cfx's DiME on images ``x`` ([-1, 1]) with the case's settings: (outputs, trace events, counts)."""
    return traced_run(*make_dime(fx, case), x, targets)


def traced_run(exp, clf, x, targets):
    """Explainer ``exp`` (DiME or a subclass) on images ``x`` ([-1, 1]): (outputs, its trace events, counts of UNet
    images and classifier gradients)."""
    events: list[tuple[str, dict]] = []
    exp.trace = lambda event, **data: events.append((event, data))
    unet_images = []
    hook = exp.model.net.register_forward_hook(lambda _m, args, _o: unet_images.append(args[0].shape[0]))
    n = x.shape[0]
    batch = ExplainBatch(ids=[f"img{i}" for i in range(n)], images=(x + 1) / 2, targets=targets,
                         sources=1 - targets, seeds=[0] * n)
    try:
        outs = exp.explain(batch)
    finally:
        hook.remove()
    return outs, events, {"unet": sum(unet_images), "clf_grad": clf.gradient_calls}


def maxdiff(a, b) -> float:
    """Max |a − b| over the rows of ``b`` that are not NaN (rows of images that skipped an attempt)."""
    a, b = a.float(), b.float()
    assert a.shape == b.shape, (a.shape, b.shape)
    keep = ~torch.isnan(b.reshape(b.shape[0], -1)).any(1)
    return float((a[keep] - b[keep]).abs().max()) if keep.any() else 0.0


def by_attempt(events, event: str):
    out: dict[int, list[dict]] = {}
    for name, data in events:
        if name == event:
            out.setdefault(data["attempt"], []).append(data)
    return out


def rows_tensor(values: dict[int, torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """Stack per-image results into a batch tensor with NaN rows for the images that are missing."""
    out = torch.full((n, *like.shape[1:]), math.nan)
    for i, v in values.items():
        out[i] = v
    return out


def check_case(fx, case: dict, outs, events, rows: list[int]) -> None:
    """cfx's results for the images at batch ``rows`` against the case's reference tensors."""
    k, t = case["name"], fx["tensors"]
    tol = fx["meta"]["tolerance"]["float_max_abs"]
    pos = {r: j for j, r in enumerate(rows)}  # batch row → fixture row
    n = len(rows)
    (z_tau,) = [d for e, d in events if e == "z_tau"]
    assert maxdiff(z_tau["z_tau"][rows], t[f"{k}_z_tau"]) <= tol, k
    steps, attempts = by_attempt(events, "step"), by_attempt(events, "attempt")
    n_ref = sum(f"{k}_attempt{j}_cf" in t for j in range(len(case["cli_flags"]["classifier_scales"].split(","))))
    assert n_ref == len(case["observed"]["attempts"]) >= 1, k
    assert sorted(attempts) == list(range(1, n_ref + 1)), f"{k}: cfx ran attempts {sorted(attempts)}"
    for j in range(n_ref):  # reference attempt j is cfx's attempt j + 1
        ref_flipped = t[f"{k}_attempt{j}_flipped"]
        took_part = [r for r in range(n) if int(ref_flipped[r]) >= 0]
        (att,) = attempts[j + 1]
        here = [pos[r] for r in att["rows"] if r in pos]
        assert sorted(here) == took_part, f"{k} attempt {j}: images {here} ran, reference {took_part}"
        sub = {pos[r]: i for i, r in enumerate(att["rows"]) if r in pos}  # fixture row → row in the attempt
        z0 = rows_tensor({f: att["z0"][i] for f, i in sub.items()}, n, att["z0"])
        assert maxdiff(z0, t[f"{k}_attempt{j}_cf"]) <= tol, f"{k} attempt {j}: cf"
        score = att["logits"][:, 1] - att["logits"][:, 0]
        logit = rows_tensor({f: score[i] for f, i in sub.items()}, n, score)
        assert maxdiff(logit, t[f"{k}_attempt{j}_logit"]) <= tol, f"{k} attempt {j}: logit"
        for f, i in sub.items():
            assert int(att["flipped"][i]) == int(ref_flipped[f]), f"{k} attempt {j}: flipped (image {f})"
        # every step's z_t and x_t at its start; index 1 = after the first step
        tau = int(case["cli_flags"]["start_step"])
        assert [s["t"] for s in steps[j + 1]] == list(range(tau - 1, -1, -1)), k
        for name, key in (("z", "z"), ("x", "x_t")):
            got = torch.stack([rows_tensor({f: s[key][i] for f, i in sub.items()}, n, s[key])
                               for s in steps[j + 1]])
            ref = t[f"{k}_attempt{j}_{name}_steps"]
            assert got.shape == ref.shape, (k, j, name, got.shape, ref.shape)
            for step in range(tau):
                assert maxdiff(got[step], ref[step]) <= tol, f"{k} attempt {j}: {name}_steps[{step}]"
            assert maxdiff(got[1], t[f"{k}_attempt{j}_{name}_after_first_step"]) <= tol, k
    # the final counterfactual, the attempt that produced it, whether it flipped
    for f in range(n):
        out = outs[rows[f]]
        ref_attempt = int(t[f"{k}_attempt_of_cf"][f])
        assert out.params["attempt"] == ref_attempt + 1, f"{k}: attempt_of_cf (image {f})"
        cf_ref = t[f"{k}_cf"][f]
        assert float((out.counterfactual - ((cf_ref + 1) / 2).clamp(0, 1)).abs().max()) <= tol, f"{k}: cf"
        (att,) = attempts[ref_attempt + 1]
        i = att["rows"].index(rows[f])
        assert maxdiff(att["z0"][i:i + 1], cf_ref[None]) <= tol, f"{k}: cf (raw)"
        score = float(att["logits"][i, 1] - att["logits"][i, 0])
        assert abs(score - float(t[f"{k}_logit_cf"][f])) <= tol, f"{k}: logit_cf"
        assert int(att["flipped"][i]) == int(t[f"{k}_flipped"][f]), f"{k}: flipped"


def cases(fx) -> list[dict]:
    listed = fx["meta"]["cases"]
    assert listed, "cases.json lists no case"
    return listed


def case_inputs(fx, case):
    t = fx["tensors"]
    return t[f"{case['name']}_x"], t[f"{case['name']}_target"]


@pytest.mark.slow  # ~25 s on the shared 2-core machine
def test_dime_e2e_every_case_matches_the_authors_code(fx):
    for case in cases(fx):
        k = case["name"]
        x, target = case_inputs(fx, case)
        assert x.shape[0] == case["batch"], k
        # the target main.py chooses: the other class of the prediction (what cfx's --target auto gives)
        with torch.no_grad():
            logit_x = fx["net"](x)
        assert maxdiff(logit_x, fx["tensors"][f"{k}_logit_x"]) <= 1e-4, k
        assert torch.equal((logit_x <= 0).long(), target), k
        outs, events, counts = run(fx, case, x, target)
        check_case(fx, case, outs, events, list(range(x.shape[0])))
        # network evaluations: what ran, what the manifest says, what the authors' code ran
        obs = case["observed"]
        assert counts["unet"] == obs["unet_evaluations"]["image_evaluations"]["no_grad"], k
        assert counts["clf_grad"] == obs["classifier_gradient_calls"], k
        assert sum(o.params["nfe_model"] for o in outs) == counts["unet"], k
        assert sum(o.params["nfe_classifier"] for o in outs) == counts["clf_grad"], k
        assert sum(o.nfe for o in outs) == counts["unet"] + counts["clf_grad"], k


@pytest.mark.slow  # ~15 s
def test_dime_e2e_through_the_binary_classifier_spec(fx):
    """The user's way to plug in the fixture's single-logit model: a python: spec with #binary=1 (and the
    normalisation that maps cfx's [0, 1] to the model's [-1, 1]) gives the authors' counterfactuals."""
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    root = fixture_dir("dime-e2e")
    spec = (f"python:{root / 'classifier.py'}:build@{root / 'classifier.safetensors'}"
            "#binary=1&size=32&mean=0.5&std=0.5")
    clf = load_classifier(spec, ClassifierOptions())
    for case in cases(fx):
        k = case["name"]
        x, target = case_inputs(fx, case)
        exp, _ = make_dime(fx, case, clf)
        outs = exp.explain(ExplainBatch(ids=["a"] * x.shape[0], images=(x + 1) / 2, targets=target,
                                        sources=1 - target, seeds=[0] * x.shape[0]))
        for f, out in enumerate(outs):
            cf_ref = ((fx["tensors"][f"{k}_cf"][f] + 1) / 2).clamp(0, 1)
            assert float((out.counterfactual - cf_ref).abs().max()) <= 1e-4, k
            assert out.params["attempt"] == int(fx["tensors"][f"{k}_attempt_of_cf"][f]) + 1, k


@pytest.mark.slow  # ~60 s on the shared 2-core machine
def test_dime_e2e_results_do_not_depend_on_the_batch(fx):
    """Each case's image(s) in a batch with every other case's images, placed after them, with the case's
    settings: the case's rows still match the reference, and the other rows equal those images run alone."""
    listed = cases(fx)
    for case in listed:
        x, target = case_inputs(fx, case)
        others = [case_inputs(fx, c) for c in listed if c is not case] or [(x, target)]  # one case: itself twice
        ox = torch.cat([o[0] for o in others])
        ot = torch.cat([o[1] for o in others])
        outs, events, _ = run(fx, case, torch.cat([ox, x]), torch.cat([ot, target]))
        rows = list(range(ox.shape[0], ox.shape[0] + x.shape[0]))
        check_case(fx, case, outs, events, rows)
        alone, _, _ = run(fx, case, ox, ot)
        for i in range(ox.shape[0]):
            assert outs[i].params["attempt"] == alone[i].params["attempt"], case["name"]
            diff = float((outs[i].counterfactual - alone[i].counterfactual).abs().max())
            assert diff <= fx["meta"]["tolerance"]["float_max_abs"], (case["name"], i, diff)


@pytest.mark.slow  # ~8 s
def test_dime_e2e_old_z_tau_level_is_off_by_one_step(fx):
    """The option that keeps cfx's former indexing (z_τ at the first step's level τ−1) really differs from the
    authors' code: the bar discriminates it (README: τ + 1 moves cf by ≥ 0.5)."""
    case = cases(fx)[0]
    x, target = case_inputs(fx, case)
    exp, _ = make_dime(fx, case, z_tau_level="tau-1")
    events: list = []
    exp.trace = lambda event, **data: events.append((event, data))
    exp.explain(ExplainBatch(ids=["a"], images=(x + 1) / 2, targets=target, sources=1 - target, seeds=[0]))
    (z_tau,) = [d["z_tau"] for e, d in events if e == "z_tau"]
    assert maxdiff(z_tau, fx["tensors"][f"{case['name']}_z_tau"]) > 1e-2


def authors_class_grad(net, x, target, scale: float, use_logits: bool):
    """The class gradient of the authors' ``clean_class_cond_fn`` (core/sample_utils.py) on a single logit."""
    import torch.nn.functional as F

    x_in = x.detach().requires_grad_(True)
    logit = net(x_in)
    y = target.float()
    selected = y * logit - (1 - y) * logit
    selected = -selected if use_logits else -F.logsigmoid(selected)
    return torch.autograd.grad((selected * scale).sum(), x_in)[0]


def test_dime_class_gradient_is_the_authors_for_any_2_logit_wrapper(fx):
    """loss=logits / ce through target_score give the authors' ∓logit / −log σ(±logit) gradient on both 2-logit
    wrappings of the single-logit model and for both targets; the former −z_{y'} (loss=target_logit) does not."""
    case = cases(fx)[0]
    x = torch.cat([case_inputs(fx, c)[0] for c in cases(fx)] * 2)[:4]
    targets = torch.tensor([0, 1, 1, 0])[: x.shape[0]]
    scale = 3.0
    for loss, use_logits in (("logits", True), ("ce", False)):
        ref = authors_class_grad(fx["net"], x, targets, scale, use_logits)
        assert float(ref.abs().max()) > 0
        for split in (False, True):
            exp, _ = make_dime(fx, case, SingleLogitClassifier(fx["net"], split=split), loss=loss)
            got = exp._clean_grad(x, x, targets, None, None, scale)
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), (loss, split)
    exp, _ = make_dime(fx, case, SingleLogitClassifier(fx["net"]), loss="target_logit")
    old = exp._clean_grad(x, x, targets, None, None, scale)
    assert float(old[targets == 0].abs().max()) == 0.0  # (0, l): −z_0 = 0 has no gradient at all


def test_dime_e2e_fixture_is_complete(fx):
    for case in cases(fx):
        k = case["name"]
        for name in ("x", "target", "z_tau", "cf", "attempt_of_cf", "flipped", "logit_cf", "noise"):
            assert f"{k}_{name}" in fx["tensors"], f"{k}_{name}"
        assert set(case["tensors"]) <= set(fx["tensors"]), k
        # the noise the README describes is constant_noise's
        noise = constant_noise(case["noise_seed"]).fn
        ref = fx["tensors"][f"{k}_noise"]
        assert torch.equal(noise(Draw("a", 0, "z_tau"), tuple(ref.shape)), ref), k
