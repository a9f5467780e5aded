"""The published CelebA/BDD classifiers: ``#binary=1`` (one logit per image) and ``#attribute=K|NAME`` (one output of
a 40-attribute sigmoid model) on tiny random models — probabilities, labels, errors, the authors' class gradients
through DiME's and ACE's own class-loss code, and the MNAC/CD oracle reading all 40 attributes or one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: CelebA's 40 attributes in the order of list_attr_celeba.txt (31 = Smiling, 39 = Young, as in the papers)
CELEBA = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
          "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
          "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
          "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
          "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()

MODELS = '''
import torch
from torch import nn


def varied(n, seed):
    """Random images of varied brightness and contrast (uniform noise alone looks the same to a small CNN)."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.rand(n, 1, 1, 1, generator=g), torch.rand(n, 1, 1, 1, generator=g)
    return torch.rand(n, 3, 16, 16, generator=g) * u + (1 - u) * v


def _net(outputs, seed, sigmoid=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, stride=2, padding=1), nn.ReLU(),
              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, outputs)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():  # logits of a few units, centred on varied images: both signs occur
        net[-1].weight.mul_(20)
        out = net(varied(64, 99))
        net[-1].bias.sub_(out.median(0).values)
        net[-1].weight.mul_(3 / out.std(0).clamp_min(1e-3)[:, None])
        net[-1].bias.mul_(3 / out.std(0).clamp_min(1e-3))
    return nn.Sequential(net, nn.Sigmoid()) if sigmoid else net


def single_logit():
    return _net(1, 0)


def single_probability():
    return _net(1, 0, sigmoid=True)


def forty():
    return _net(40, 1)


def ten():
    return _net(10, 2)
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "celeba_models.py"
    path.write_text(MODELS)
    return path


def module(models: Path):
    """MODELS imported outside cfx: the authors' side of each comparison."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("celeba_models_reference", models)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def forty_ts(tmp_path_factory, models) -> Path:
    """The 40-attribute model as TorchScript carrying CelebA's attribute names (cfx.json metadata)."""
    path = tmp_path_factory.mktemp("ts") / "attributes.pt"
    scripted = torch.jit.trace(module(models).forty(), torch.rand(1, 3, 16, 16))
    torch.jit.save(scripted, str(path), _extra_files={"cfx.json": json.dumps({"labels": CELEBA})})
    return path


def raw(models: Path, factory: str, x):
    """The model's own outputs."""
    with torch.no_grad():
        return getattr(module(models), factory)()(x)


def load(spec: str, labels=None):
    from cfx_cli.classifiers import ClassifierOptions, load_classifier

    return load_classifier(spec, ClassifierOptions(labels=labels))


# -- probabilities and labels -------------------------------------------------------------------------------
def test_binary_logits_give_each_class_a_gradient(models):
    """Class 0's own logit is −l/2, not a constant: Grad-CAM and any per-class gradient see both classes."""
    clf = load(f"python:{models}:single_logit#binary=1")
    x = module(models).varied(2, 0).requires_grad_(True)
    (g0,) = torch.autograd.grad(clf.logits(x)[:, 0].sum(), x)
    (g1,) = torch.autograd.grad(clf.logits(x)[:, 1].sum(), x)
    assert float(g1.abs().max()) > 0
    torch.testing.assert_close(g0, -g1)


def test_binary_presents_two_classes_from_one_logit(models):
    clf = load(f"python:{models}:single_logit#binary=1")
    x = module(models).varied(6, 0)
    l = raw(models, "single_logit", x)[:, 0]  # noqa: E741 - the papers' l
    assert (l > 0).any() and (l < 0).any()
    p = clf.predict_proba(x)
    torch.testing.assert_close(p, torch.stack([1 - torch.sigmoid(l), torch.sigmoid(l)], 1))
    assert p.argmax(1).tolist() == (l > 0).long().tolist()  # logit > 0 ⇔ class 1
    torch.testing.assert_close(clf.logits(x), torch.stack([-l / 2, l / 2], 1))
    assert clf.labels == ["0", "1"] and clf.capabilities == {"probabilities", "gradients"}
    assert clf.calls == 12  # the load-time probe is not counted
    assert load(f"python:{models}:single_logit#binary=1", ["old", "young"]).labels == ["old", "young"]
    assert load(f"python:{models}:single_logit#binary=1", ["Young"]).labels == ["not-Young", "Young"]
    # a model that ends in a sigmoid: #logits=0 declares probabilities, the same classifier results
    same = load(f"python:{models}:single_probability#binary=1&logits=0")
    torch.testing.assert_close(same.predict_proba(x), p, atol=1e-5, rtol=0)
    torch.testing.assert_close(same.logits(x), clf.logits(x), atol=1e-4, rtol=0)
    assert load(f"python:{models}:ten#binary=0").labels == [str(i) for i in range(10)]  # #binary=0: as before


def test_attribute_by_index_or_name_from_labels_or_the_model(models, forty_ts):
    x = module(models).varied(6, 0)
    l31 = raw(models, "forty", x)[:, 31]
    want = torch.stack([1 - torch.sigmoid(l31), torch.sigmoid(l31)], 1)
    for spec, labels in ((f"torchscript:{forty_ts}#attribute=Smiling", None),  # the model's names
                         (f"torchscript:{forty_ts}#attribute=smiling", None),  # case-insensitive when unique
                         (f"python:{models}:forty#attribute=Smiling", CELEBA),  # --labels names the outputs
                         (f"python:{models}:forty#attribute=31", CELEBA)):
        clf = load(spec, labels)
        assert clf.labels == ["not-Smiling", "Smiling"], spec
        torch.testing.assert_close(clf.predict_proba(x), want)
        torch.testing.assert_close(clf.logits(x) @ torch.tensor([-1.0, 1.0]), l31)
    assert load(f"python:{models}:forty#attribute=39").labels == ["not-39", "39"]
    assert load(f"torchscript:{forty_ts}#attribute=39", ["old", "young"]).labels == ["old", "young"]
    info = load(f"torchscript:{forty_ts}#attribute=Young").describe()
    assert info["output"]["index"] == 39 and info["labels"] == ["not-Young", "Young"]
    assert info["spec"].endswith("#attribute=Young")


def test_the_dime_fixture_classifier_plugs_in(tmp_path):
    """The dime-e2e fixture's classifier is shaped like the authors' (one logit of shape (B,), [−1, 1] inputs):
    with #binary=1 and the spec's normalisation it gives the fixture's logits, and DiME's targets."""
    from conftest import fixture_dir
    from safetensors.torch import load_file

    folder = fixture_dir("dime-e2e")
    tensors = load_file(str(folder / "tensors.safetensors"))
    spec = (f"python:{folder / 'classifier.py'}:build@{folder / 'classifier.safetensors'}"
            "#binary=1&size=32&mean=0.5&std=0.5")
    clf = load(spec, ["not-smiling", "smiling"])
    for case in ("case0", "case1"):
        x01 = (tensors[f"{case}_x"] + 1) / 2
        torch.testing.assert_close(clf.logits(x01) @ torch.tensor([-1.0, 1.0]), tensors[f"{case}_logit_x"],
                                   atol=1e-5, rtol=1e-5)
        source = clf.predict_proba(x01).argmax(1)
        assert (1 - source).tolist() == tensors[f"{case}_target"].tolist()  # the fixture's target: the other class
    from cfx_cli.errors import UsageError

    with pytest.raises(UsageError, match=r"a test forward pass on a 224×224 image failed .*#size=HxW"):
        load(spec.replace("&size=32", ""))


@pytest.mark.parametrize(("spec", "labels", "message"), [
    ("python:{m}:forty#attribute=40", None, r"#attribute=40 is out of range: the model has 40 outputs \(0–39\)"),
    ("torchscript:{ts}#attribute=Smilin", None, "unknown attribute 'Smilin' .*5_o_Clock_Shadow"),
    ("python:{m}:forty#attribute=Smiling", None, "does not name its 40 outputs; give an index or --labels"),
    ("python:{m}:forty#attribute=3", ["a", "b", "c"], "--labels gives 3 names; #attribute takes 40"),
    ("python:{m}:ten#binary=1", None, "#binary=1 needs a model with one output per image; this one returns 10"),
    ("torchscript:{ts}#binary=1", None, "this one returns 40"),
    ("python:{m}:single_logit#binary=1", ["a", "b", "c"], "--labels gives 3 names; #binary=1 takes 2"),
    ("python:{m}:forty#binary=1&attribute=3", None, "#binary and #attribute exclude each other"),
    ("python:{m}:forty#binary=maybe", None, "option binary='maybe': expected true or false"),
    ("python:{m}:forty#attribute=3&colour=red", None, r"forty#attribute=3&colour=red: unknown option\(s\) colour "
                                                      r".*binary, attribute"),
])
def test_bad_options_are_one_line_usage_errors(models, forty_ts, spec, labels, message):
    from cfx_cli.errors import UsageError

    with pytest.raises(UsageError, match=message) as info:
        load(spec.format(m=models, ts=forty_ts), labels)
    assert "\n" not in str(info.value) and str(info.value).startswith("classifier ")


def test_black_box_onnx_single_logit(tmp_path, models):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    path = tmp_path / "single.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module(models).single_logit(), (torch.rand(2, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["images"], output_names=["logit"],
                          dynamic_axes={"images": {0: "n"}, "logit": {0: "n"}})
    clf = load(f"onnx:{path}#binary=1&logits=1")
    x = module(models).varied(6, 0)
    torch.testing.assert_close(clf.predict_proba(x), load(f"python:{models}:single_logit#binary=1").predict_proba(x),
                               atol=1e-5, rtol=0)
    assert clf.capabilities == {"probabilities"} and clf.labels == ["0", "1"]
    from cfx_cli.errors import ClassifierError

    with pytest.raises(ClassifierError, match="black box"):
        clf.logits(x)


def test_hf_multi_label_model_explains_one_attribute_by_its_id2label_name(tmp_path, capsys):
    pytest.importorskip("transformers")
    from hf_helpers import make_vit

    folder = make_vit(tmp_path / "ml", problem_type="multi_label_classification")
    plain = load(f"hf:{folder}")
    assert "#attribute=NAME" in capsys.readouterr().err  # the note points at the option
    clf = load(f"hf:{folder}#attribute=digit 7")
    assert "note:" not in capsys.readouterr().err
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    l7 = plain.logits(x)[:, 7]
    assert clf.labels == ["not-digit 7", "digit 7"]
    torch.testing.assert_close(clf.predict_proba(x)[:, 1], torch.sigmoid(l7).detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clf.logits(x), torch.stack([-l7 / 2, l7 / 2], 1))


SCORE_PROGRAM = '''
import base64, io, json, math, sys

import numpy as np
from PIL import Image

for line in sys.stdin:  # one sigmoid probability per image: a "brightness" detector
    images = json.loads(line)["images"]
    means = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))), dtype=np.float64).mean() / 255 for b in images]
    logits = [8 * (m - 0.5) for m in means]
    column = logits if "--logits" in sys.argv else [1 / (1 + math.exp(-v)) for v in logits]
    print(json.dumps({"probabilities": [[v] for v in column]}), flush=True)
'''


@pytest.mark.parametrize("logits", [False, True])
def test_black_box_cmd_program_answering_one_score(tmp_path, logits):
    """A program speaking the subprocess protocol that answers one column (a sigmoid output) per image."""
    import sys

    program = tmp_path / "score.py"
    program.write_text(SCORE_PROGRAM)
    spec = f"cmd:{sys.executable} {program}" + (" --logits#binary=1&logits=1" if logits else "#binary=1")
    clf = load(spec, ["dark", "bright"])
    try:
        x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.3, 0.6, 0.9, 1.0])[
            :, None, None, None]
        x = torch.round(x * 255) / 255  # the PNGs the program reads are 8-bit
        p = torch.sigmoid(8 * (x.mean(dim=(1, 2, 3)).double() - 0.5)).float()
        assert clf.labels == ["dark", "bright"] and clf.capabilities == {"probabilities"}
        torch.testing.assert_close(clf.predict_proba(x), torch.stack([1 - p, p], 1), atol=1e-5, rtol=0)
        assert clf.predict_proba(x).argmax(1).tolist() == (p > 0.5).long().tolist()
    finally:
        clf.close()
    plain = load(f"cmd:{sys.executable} {program}")  # without #binary: the one column is not a distribution
    try:
        from cfx_cli.errors import ClassifierError

        with pytest.raises(ClassifierError, match="must sum to 1"):
            plain.predict_proba(x)
    finally:
        plain.close()


# -- the authors' class gradients through the explainers' own class loss ----------------------------------
CASES = [("single_logit", "#binary=1", 0), ("forty", "#attribute=31", 31), ("forty", "#attribute=39", 39)]


def explainer(method: str, classifier, **params):
    from cfx_cli.explainers import ExplainContext
    from cfx_cli.params import resolve_params
    from cfx_cli.plugins import get_explainer_class

    cls = get_explainer_class(method)
    resolved = resolve_params(method, cls.params, cls.presets, {k: str(v) for k, v in params.items()})
    return cls(ExplainContext(classifier=classifier, params=resolved, model="demo:pixel"))


def authors_logit(models: Path, factory: str, index: int):
    """The authors' formulation: the model's own output ``index``, differentiable (no cfx in between)."""
    net = getattr(module(models), factory)()
    return lambda x: net(x)[:, index]


@pytest.mark.parametrize(("factory", "option", "index"), CASES)
@pytest.mark.parametrize("loss", ["logits", "ce"])
def test_dime_class_gradient_is_the_authors_signed_logit_loss(models, factory, option, index, loss):
    """DiME's code: use_logits → L = −(±l); otherwise BCE = −log σ(±l); (target 1: +, target 0: −)."""
    clf = load(f"python:{models}:{factory}{option}")
    exp = explainer("dime", clf, loss=loss, perceptual="none", tau=2, respacing="10")
    x_t = module(models).varied(4, 1) * 2 - 1  # DiME's x_t lives in [−1, 1]
    targets = torch.tensor([1, 0, 1, 0])
    scale = 7.5
    got = exp._clean_grad(x_t, x_t, targets, None, None, scale)
    logit = authors_logit(models, factory, index)
    xt = x_t.clone().requires_grad_(True)
    signed = torch.where(targets == 1, 1.0, -1.0) * logit((xt + 1) / 2)
    authors = -signed if loss == "logits" else -F.logsigmoid(signed)
    (want,) = torch.autograd.grad(scale * authors.sum(), xt)
    assert want.abs().amax(dim=(1, 2, 3)).min() > 0  # every image, both targets, has a class gradient
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("factory", "option", "index"), CASES)
@pytest.mark.parametrize(("class_weight", "reduction"), [(1.0, "sum"), (1 / 3, "mean")])
def test_ace_class_gradient_is_the_authors_bce_with_logits(models, factory, option, index, class_weight, reduction):
    """ACE's CelebA code: BCE-with-logits of the explained logit through the diffusion filter F_τ, averaged over its
    batch of 3 (class_weight 1/3, the celeba preset's) or summed (the default, class_weight 1)."""
    from cfx_cli.diffusion.noise import SeededNoise

    clf = load(f"python:{models}:{factory}{option}")
    exp = explainer("ace", clf, tau=2, respacing="10", lambda_d=0, class_weight=class_weight)
    x = module(models).varied(3, 2)
    targets = torch.tensor([0, 1, 1])
    noise = SeededNoise().for_batch(["a", "b", "c"], [1, 2, 3], "cpu")
    draws = exp._draw(noise, [0, 1, 2], (3, 16, 16), exp.filter_keys(0))
    got = exp.class_gradient(x, targets, draws)
    logit = authors_logit(models, factory, index)
    x_ref = x.clone().requires_grad_(True)
    bce = F.binary_cross_entropy_with_logits(logit(exp.filter(x_ref, draws)), targets.float(), reduction=reduction)
    (want,) = torch.autograd.grad(bce, x_ref)
    assert want.abs().amax(dim=(1, 2, 3)).min() > 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# -- oracles: all 40 attributes compared, or one -----------------------------------------------------------
@pytest.fixture(scope="module")
def pgd_run(tmp_path_factory) -> Path:
    from conftest import run_cfx

    from cfx_cli.demo import IMAGES_DIR

    out = tmp_path_factory.mktemp("oracle") / "run"
    proc = run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--target", "3", "--out", str(out),
                   "--limit", "8", "--set", "eps=0.3", "--set", "step=0.02")
    assert proc.returncode == 0, proc.stderr
    return out


def oracle_on(models: Path, run: Path, key: str):
    """Per flipped record: the 40 attributes' on/off state (σ(l) > 0.5) of the image ``key``, outside cfx."""
    from cfx_cli.images import decode

    recs = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["status"] == "flipped"]
    x = torch.from_numpy(np.stack([decode(run / r[key]) for r in recs])).permute(0, 3, 1, 2).float()
    return (torch.sigmoid(raw(models, "forty", x)) > 0.5).numpy()


def test_mnac_oracle_compares_all_40_attributes_or_one(models, forty_ts, pgd_run):
    from conftest import run_cfx

    before, after = oracle_on(models, pgd_run, "original"), oracle_on(models, pgd_run, "counterfactual")
    assert len(before) >= 2
    changed = (before != after).sum(1)
    for oracle, want in ((f"torchscript:{forty_ts}", changed.mean()),
                         (f"torchscript:{forty_ts}#attribute=Smiling", (before[:, 31] != after[:, 31]).mean())):
        proc = run_cfx("eval", str(pgd_run), "--metrics", "mnac", "--format", "json", "--set", f"oracle={oracle}",
                       "--set", "oracle_activation=sigmoid")
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)["runs"][0]
        assert row["skipped"] == {}, row
        assert row["mnac"] == pytest.approx(float(want)), oracle
    assert changed.mean() > 0  # the 40-attribute case is not trivially 0


def test_explain_and_eval_with_an_attribute_named_by_labels(tmp_path, models):
    """The CLI end to end: --labels names the 40 outputs, #attribute=Smiling picks one; cfx eval reloads the run's
    classifier (COUT) with the names run.json recorded."""
    from conftest import run_cfx

    from cfx_cli.demo import IMAGES_DIR

    names = tmp_path / "celeba_attributes.txt"
    names.write_text("\n".join(CELEBA) + "\n")
    run = tmp_path / "run"
    spec = f"python:{models}:forty#attribute=Smiling"
    proc = run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--target", "auto", "--classifier", spec,
                   "--labels", str(names), "--limit", "3", "--set", "eps=0.3", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "run.json").read_text())["classifier"]
    assert info["labels"] == ["not-Smiling", "Smiling"] and info["output"]["index"] == 31
    records = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert all({r["source_label"], r["target_label"]} == {"not-Smiling", "Smiling"} for r in records)
    proc = run_cfx("eval", str(run), "--metrics", "cout", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["skipped"] == {} and -1 <= row["cout"] <= 1
