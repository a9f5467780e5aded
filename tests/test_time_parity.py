"""TIME against the authors' code (github.com/guillaumejs2403/TIME): cfx's generation loop reproduces the stored
outputs of their ``generate-ce.py`` loop (``tests/fixtures/time-xcheck``, written by
``scripts/crosscheck_time_reference.py``) for every case and every (τ, g) attempt, without their code here."""

from __future__ import annotations

import pytest

from tests.conftest import fixture_dir

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def xc(tmp_path_factory):
    from safetensors.torch import load_file

    from tests.time_xcheck import XCHECK, assemble_folder, cfx_generator, load_inputs

    edict = fixture_dir("time-edict")
    image, sources, cases = load_inputs()
    root = tmp_path_factory.mktemp("xcheck")
    gens = {pred: cfx_generator(assemble_folder(edict, root / pred, pred))
            for pred in {c["prediction_type"] for c in cases}}
    return {"image": image, "sources": sources, "cases": cases, "gens": gens,
            "ref": load_file(str(XCHECK / "reference.safetensors"))}


def _diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def test_time_parity_fixture_lists_every_case(xc):
    names = {c["name"] for c in xc["cases"]}
    assert {"eps", "edge", "v"} <= names
    for c in xc["cases"]:  # every attempt of every case has its reference outputs
        for k in range(1, len(c["schedule"]) + 1):
            assert f"{c['name']}_a{k}_counterfactual" in xc["ref"]


@pytest.mark.slow
def test_time_parity_every_attempt_matches_the_authors_loop(xc):
    """Encoding, prompt embeddings with the fitted tokens, EDICT inversion (legacy pairing, including τ = T),
    guided denoising and decoding of every (τ, g) attempt, g = w (the default convention)."""
    from tests.time_xcheck import expected_to_match, run_cfx_case, tolerance

    checked = 0
    for case in xc["cases"]:
        ours = run_cfx_case(xc["gens"][case["prediction_type"]], case, xc["image"], xc["sources"])
        for key, ref in xc["ref"].items():
            if key.startswith(case["name"] + "_") and expected_to_match(case, key):
                assert _diff(ours[key], ref) <= tolerance(key), key
                checked += 1
    assert checked >= 24


def test_time_parity_counterfactuals_differ_from_the_input(xc):
    """The comparison is not vacuous: the guided attempts really edit the image."""
    ref, image = xc["ref"], xc["image"]
    assert _diff(ref["eps_a4_counterfactual"], image) > 0.05
    assert _diff(ref["eps_a1_counterfactual"], ref["eps_a4_counterfactual"]) > 1e-2


def test_time_parity_old_convention_is_g_one_plus_w(xc):
    """guidance=1+w (cfx's old default) with the schedule written as w = g − 1 computes the same attempt."""
    from tests.time_xcheck import run_cfx_case

    case = next(c for c in xc["cases"] if c["name"] == "edge")
    old = {**case, "schedule": [[tau, g - 1] for tau, g in case["schedule"]]}
    ours = run_cfx_case(xc["gens"]["epsilon"], old, xc["image"], xc["sources"], guidance="1+w")
    assert _diff(ours["edge_a1_counterfactual"], xc["ref"]["edge_a1_counterfactual"]) <= 1e-3
    # and the same numbers read the old way are a different (stronger) guidance
    stronger = run_cfx_case(xc["gens"]["epsilon"], case, xc["image"], xc["sources"], guidance="1+w")
    assert _diff(stronger["edge_a1_counterfactual"], xc["ref"]["edge_a1_counterfactual"]) > 1e-3


@pytest.mark.slow
def test_time_parity_published_preset_end_to_end(xc):
    """`--set preset=published` through the explainer (a classifier that never flips: every attempt runs, the
    last one is returned) gives the authors' last attempt; the manifest's params record g = w."""
    from cfx_cli.classifiers import Classifier
    from cfx_cli.explainers import ExplainBatch, ExplainContext
    from cfx_cli.params import resolve_params
    from cfx_plugins.explainers.time import Time

    class NeverFlips(Classifier):
        capabilities = frozenset({"probabilities"})
        labels = ["serious", "smile"]
        input_size = (16, 16)
        spec = "stub:never"

        def predict_proba(self, images):
            return torch.tensor([[0.0, 1.0]]).repeat(len(images), 1)  # always "smile"

    case = next(c for c in xc["cases"] if c["name"] == "eps")
    schedule = ",".join(f"{t}:{w:g}" for t, w in case["schedule"])
    params = resolve_params("time", Time.params, Time.presets, {"preset": "published", "schedule": schedule,
                                                                "steps": str(case["total_steps"]),
                                                                "tokens": "unused"})
    assert params["edict"] == "legacy" and params["guidance"] == "w" and params["p"] == case["p"]
    ctx = ExplainContext(classifier=NeverFlips(), params=params)
    exp = Time.__new__(Time)  # the in-memory generator of the fixture instead of loading tokens from disk
    exp.context, exp.params = ctx, params
    exp._gen = xc["gens"]["epsilon"]
    exp._backend = exp._gen.model.use_backend(ctx)
    # image 0 is "serious" → target "smile"; image 1 targets "serious", which NeverFlips never predicts
    batch = ExplainBatch(ids=["a", "b"], images=xc["image"], sources=xc["sources"], targets=1 - xc["sources"],
                         seeds=[0, 0])
    outs = exp.explain(batch)
    last = len(case["schedule"])
    assert outs[0].params["attempt"] == 1 and outs[0].params["flipped_at_attempt"]
    assert outs[1].params["attempt"] == last and not outs[1].params["flipped_at_attempt"]
    assert outs[1].params["g"] == outs[1].params["w"] == case["schedule"][-1][1]
    assert _diff(outs[0].counterfactual, xc["ref"]["eps_a1_counterfactual"][0]) <= 1e-3
    assert _diff(outs[1].counterfactual, xc["ref"][f"eps_a{last}_counterfactual"][1]) <= 1e-3
