"""ACE against the authors' published code: every case of ../shared/fixtures/ace-e2e (its README gives the noise
convention and the bar), run through cfx's own ADM loader (``--model adm:PATH --model-flags ...``), the fixture
classifier as a ``python:`` white-box classifier and ``constant_noise(seed)`` as the explainer's noise source.

End to end (pre-explanation, masks, refinement start, counterfactual, logits, flips, NFE), then the README's four
step-by-step checks, which do not cascade through PGD's signs: the class gradient at each stored iterate, one
PGD update from the stored gradient, the masks from the stored pre-explanation, the refinement from it. Finally a
case's image explained together with another image gives the same result (cfx's class loss is summed per image;
the authors' batch mean is reproduced by ``class_weight`` = 1/batch, which does not depend on the companions)."""

from __future__ import annotations

import json

import pytest
from conftest import fixture_dir

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from cfx_cli.diffusion.noise import constant_noise  # noqa: E402 - after the torch check
from cfx_cli.explainers import ExplainBatch, ExplainContext  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTACKS = {"PGD": "pgd", "GD": "gd", "C&W": "cw", "CW": "cw"}  # the authors' --attack_method → cfx's attack


class Fixture:
    def __init__(self) -> None:
        from safetensors.torch import load_file

        from cfx_cli.classifiers import ClassifierOptions, load_classifier

        self.root = fixture_dir("ace-e2e")
        self.adm = fixture_dir("adm-unet")
        doc = json.loads((self.root / "cases.json").read_text())
        self.cases = doc["cases"]
        self.tol = float(doc["tolerance"]["float_max_abs"])
        self.t = load_file(str(self.root / "tensors.safetensors"))
        size = self.t[f"{self.cases[0]['name']}_x"].shape[-1]
        # as `--classifier python:classifier.py:build@classifier.safetensors#size=32` would load it
        spec = f"python:{self.root / 'classifier.py'}:build@{self.root / 'classifier.safetensors'}#size={size}"
        self.classifier = load_classifier(spec, ClassifierOptions())

    def tensor(self, case: dict, key: str):
        return self.t[f"{case['name']}_{key}"]


@pytest.fixture(scope="module")
def fx() -> Fixture:
    return Fixture()


def model_flags(case: dict) -> str:
    """The --model-flags string of the authors' MODEL_FLAGS for this case's network."""
    flags = dict(case["hyperparameters"]["unet"]["flags"])
    cli = case["cli_flags"]
    flags.update(diffusion_steps=cli["diffusion_steps"], noise_schedule=cli["noise_schedule"])
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def ace_settings(case: dict) -> dict[str, str]:
    """The authors' main.py flags of a case as cfx's --set values (τ from time_fraction, as their main.py)."""
    cli = case["cli_flags"]
    assert cli["attack_joint"] and not cli["attack_joint_checkpoint"] and not cli["attack_joint_shortcut"], \
        f"{case['name']}: only the joint (non-checkpointed) attack is matched here"
    assert cli["dist_schedule"] == "none", f"{case['name']}: dist_schedule {cli['dist_schedule']!r} is not in cfx"
    assert not (cli["dist_l1"] and cli["dist_l2"]), f"{case['name']}: cfx has one distance, not both"
    l2 = bool(cli["dist_l2"])
    return {"attack": ATTACKS[cli["attack_method"]], "iterations": str(cli["attack_iterations"]),
            "step": f"{cli['attack_step']}/255", "epsilon": str(min(1.0, cli["attack_epsilon"] / 255)),
            "respacing": str(cli["timestep_respacing"]), "time_fraction": str(cli["sampling_time_fraction"]),
            "distance": "l2" if l2 else "l1", "lambda_d": str(cli["dist_l2"] if l2 else cli["dist_l1"]),
            "stochastic": str(cli["sampling_stochastic"]), "threshold": str(cli["sampling_inpaint"]),
            "dilation": str(cli["sampling_dilation"]),
            # the authors' CrossEntropyLoss averages over their batch: the weight of each image is 1/batch
            "class_weight": f"1/{case['batch']}"}


def make_ace(fx: Fixture, case: dict):
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    cls = get_explainer_class("ace")
    params = resolve_params("ace", cls.params, cls.presets, ace_settings(case))
    unet = case["hyperparameters"]["unet"]
    ctx = ExplainContext(classifier=fx.classifier, params=params, model=f"adm:{fx.adm / (unet['config'] + '.pt')}",
                         model_flags=model_flags(case), noise=constant_noise(case["noise_seed"]))
    exp = cls(ctx)
    assert exp.tau == case["hyperparameters"]["tau"], f"{case['name']}: τ = {exp.tau}"
    return exp


def make_batch(fx: Fixture, case: dict, extra=None):
    """The case's images (plus the ``extra`` (image, target) pairs) as an ExplainBatch."""
    x, target = fx.tensor(case, "x"), fx.tensor(case, "target")
    ids = [f"{case['name']}_{i}" for i in range(len(x))]
    if extra is not None:
        x, target = torch.cat([x, extra[0]]), torch.cat([target, extra[1]])
        ids += [f"extra_{i}" for i in range(len(extra[0]))]
    with torch.no_grad():
        sources = fx.classifier.logits(x).argmax(1)
    return ExplainBatch(ids=ids, images=x, targets=target, sources=sources, seeds=[0] * len(x))


def noise_rows(exp, case: dict, n: int):
    return exp.context.noise.for_batch([f"{case['name']}_{i}" for i in range(n)], [0] * n, "cpu"), list(range(n))


def maxdiff(a, b) -> float:
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    return float((a.float() - b.float()).abs().max())


def check_all(failures: list[str]) -> None:
    assert not failures, "\n".join(failures)


def test_ace_e2e_fixture_lists_cases(fx):
    assert fx.cases, "cases.json lists no case"
    for case in fx.cases:
        assert fx.tensor(case, "x").shape[0] == case["batch"], case["name"]
        # the fixture's own noise is constant_noise's draw (README "Noise (order-free)")
        ref = fx.tensor(case, "noise")
        draw = constant_noise(case["noise_seed"]).for_batch(["a"], [0], "cpu").randn([0], tuple(ref.shape), "any")
        assert torch.equal(draw[0], ref), case["name"]


@pytest.mark.slow  # ~10–20 s on the shared 2-core machine
def test_ace_e2e_every_case_end_to_end(fx):
    failures = []
    for case in fx.cases:
        name, tol = case["name"], fx.tol
        exp = make_ace(fx, case)
        exp.trace = {}
        batch = make_batch(fx, case)
        calls_before = fx.classifier.calls
        outs = exp.explain(batch)
        explain_calls = fx.classifier.calls - calls_before
        tr = exp.trace
        pe = torch.stack([o.extras["pre_explanations"] for o in outs])
        cf = torch.stack([o.counterfactual for o in outs])
        floats = {"pre_explanation": pe, "mask": tr["mask"], "dilated_mask": tr["dilated_mask"],
                  "noisy_pre_explanation": tr["noisy_pre_explanation"], "counterfactual": tr["counterfactual"],
                  "pgd_iterates": torch.stack(tr["pgd_iterates"])}
        with torch.no_grad():
            floats["logits_pre_explanation"] = fx.classifier.logits(pe)
            floats["logits_counterfactual"] = fx.classifier.logits(tr["counterfactual"])
        for key, ours in floats.items():
            diff = maxdiff(ours, fx.tensor(case, key))
            if diff > tol:
                failures.append(f"{name} {key}: max abs diff {diff:.2e} > {tol:g}")
        if maxdiff(cf, tr["counterfactual"]) != 0:  # the output is the traced counterfactual (same size here)
            failures.append(f"{name}: output counterfactual differs from the refinement's")
        target = fx.tensor(case, "target")
        exact = {"inpaint_mask": (tr["inpaint_mask"], fx.tensor(case, "inpaint_mask")),
                 "flipped_pre_explanation": (floats["logits_pre_explanation"].argmax(1) == target,
                                             fx.tensor(case, "flipped_pre_explanation").bool()),
                 "flipped_counterfactual": (floats["logits_counterfactual"].argmax(1) == target,
                                            fx.tensor(case, "flipped_counterfactual").bool())}
        for key, (ours, ref) in exact.items():
            if not torch.equal(ours, ref.to(ours.dtype)):
                failures.append(f"{name} {key}: not identical")
        # NFE: what the authors' run evaluated, per image
        obs, b = case["observed"], case["batch"]
        unet_images = sum(obs["unet_evaluations"]["image_evaluations"].values()) // b
        grads = obs["classifier"]["image_evaluations"]["with_grad"] // b
        if outs[0].params["nfe_model"] != unet_images or outs[0].params["nfe_classifier"] != grads:
            failures.append(f"{name}: NFE {outs[0].params['nfe_model']}+{outs[0].params['nfe_classifier']}, "
                            f"the authors' run {unet_images}+{grads}")
        if explain_calls != grads * b:
            failures.append(f"{name}: {explain_calls} classifier evaluations, "
                            f"expected {grads * b}")
    check_all(failures)


@pytest.mark.slow  # ~10–20 s on the shared 2-core machine
def test_ace_e2e_class_gradient_at_every_stored_iterate(fx):
    """README step 1: ∇ CE(C(F(x'_k)), y) at each stored iterate, within 1e-5."""
    failures = []
    for case in fx.cases:
        exp = make_ace(fx, case)
        iterates, grads = fx.tensor(case, "pgd_iterates"), fx.tensor(case, "pgd_class_grads")
        x = fx.tensor(case, "x")
        noise, rows = noise_rows(exp, case, len(x))
        for k in range(len(grads)):
            draws = exp._draw(noise, rows, tuple(x.shape[1:]), exp.filter_keys(k))
            diff = maxdiff(exp.class_gradient(iterates[k], fx.tensor(case, "target"), draws), grads[k])
            if diff > 1e-5:
                failures.append(f"{case['name']} iterate {k}: class gradient max abs diff {diff:.2e} > 1e-5")
    check_all(failures)


def test_ace_e2e_one_update_reproduces_the_next_iterate(fx):
    """README step 2: the PGD update of x'_k with the stored class gradient gives x'_{k+1} exactly."""
    failures = []
    for case in fx.cases:
        exp = make_ace(fx, case)
        if exp.params["attack"] == "cw":  # the README's step 2 is the PGD/GD update of x'; C&W updates w
            continue
        iterates, grads, x = fx.tensor(case, "pgd_iterates"), fx.tensor(case, "pgd_class_grads"), fx.tensor(case, "x")
        for k in range(len(grads)):
            grad = grads[k] + exp.distance_gradient(iterates[k], x)
            nxt = exp.attack_update(iterates[k], x, grad)
            if not torch.equal(nxt, iterates[k + 1]):
                failures.append(f"{case['name']} iterate {k}→{k + 1}: {int((nxt != iterates[k + 1]).sum())} "
                                f"entries differ (max {maxdiff(nxt, iterates[k + 1]):.2e})")
    check_all(failures)


def test_ace_e2e_masks_from_the_stored_pre_explanation(fx):
    """README step 3: mask and dilated mask within 1e-6, the inpaint mask identical."""
    failures = []
    for case in fx.cases:
        exp = make_ace(fx, case)
        mask, dilated, change = exp.masks(fx.tensor(case, "x"), fx.tensor(case, "pre_explanation"))
        for key, ours in (("mask", mask), ("dilated_mask", dilated)):
            if (diff := maxdiff(ours, fx.tensor(case, key))) > 1e-6:
                failures.append(f"{case['name']} {key}: max abs diff {diff:.2e} > 1e-6")
        if not torch.equal(1 - change, fx.tensor(case, "inpaint_mask")):
            failures.append(f"{case['name']} inpaint_mask: not identical")
    check_all(failures)


def test_ace_e2e_refinement_from_the_stored_pre_explanation(fx):
    """README step 4: the refinement of the stored pre-explanation with the stored inpaint mask."""
    failures = []
    for case in fx.cases:
        exp = make_ace(fx, case)
        x = fx.tensor(case, "x")
        noise, rows = noise_rows(exp, case, len(x))
        cf, start = exp.refine(x, fx.tensor(case, "pre_explanation"), 1 - fx.tensor(case, "inpaint_mask"),
                               noise, rows)
        for key, ours in (("counterfactual", cf), ("noisy_pre_explanation", start)):
            if (diff := maxdiff(ours, fx.tensor(case, key))) > fx.tol:
                failures.append(f"{case['name']} {key}: max abs diff {diff:.2e} > {fx.tol:g}")
    check_all(failures)


@pytest.mark.slow  # ~10–20 s on the shared 2-core machine
def test_ace_e2e_results_do_not_depend_on_the_batch(fx):
    """A case's images explained together with another image (the mirrored first one, the other class as
    target) still match the authors' run, and the companion's result is the one it gets alone."""
    failures = []
    for case in fx.cases:
        exp = make_ace(fx, case)
        x, target = fx.tensor(case, "x"), fx.tensor(case, "target")
        companion = (x[:1].flip(-1), 1 - target[:1])
        outs = exp.explain(make_batch(fx, case, extra=companion))
        b = case["batch"]
        batched = {"pre_explanation": torch.stack([o.extras["pre_explanations"] for o in outs[:b]]),
                   "counterfactual": torch.stack([o.counterfactual for o in outs[:b]])}
        for key, ours in batched.items():
            if (diff := maxdiff(ours, fx.tensor(case, key))) > fx.tol:
                failures.append(f"{case['name']} {key} in a batch of {b + 1}: max abs diff {diff:.2e}")
        alone = exp.explain(ExplainBatch(ids=["extra_0"], images=companion[0], targets=companion[1],
                                         sources=companion[1], seeds=[0]))[0]
        for key in ("counterfactual", "pre_explanations"):
            ours = alone.counterfactual if key == "counterfactual" else alone.extras[key]
            theirs = outs[b].counterfactual if key == "counterfactual" else outs[b].extras[key]
            if (diff := maxdiff(ours, theirs)) > fx.tol:
                failures.append(f"{case['name']} companion {key}: alone vs batched max abs diff {diff:.2e}")
    check_all(failures)

