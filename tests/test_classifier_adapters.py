"""torchscript:, python:, onnx: and cmd: adapters agree with demo:digits; white-box ones explain with pgd."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from adapter_helpers import demo_reference, export_onnx, export_torchscript, write_cmd_program

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.classify import classify_inputs
from cfx_cli.errors import ClassifierError, UsageError
from cfx_cli.images import discover

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "cfx_cli" / "demo" / "digits_classifier.safetensors"
DIGITS = [str(i) for i in range(10)]
ONE = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _probs(results: list[dict], labels=DIGITS) -> np.ndarray:
    assert all(r.get("error") is None for r in results), results
    return np.array([[r["probabilities"][lab] for lab in labels] for r in results])


@pytest.fixture(scope="module")
def reference(request):
    from cfx_cli.demo import IMAGES_DIR

    paths = [it.path for it in discover([str(IMAGES_DIR)])]
    return paths, demo_reference(paths)


def _agree(spec: str, reference, labels=DIGITS, **kw) -> None:
    paths, ref = reference
    results, failed = classify_inputs([str(paths[0].parent)], spec, None, "cpu", 5, kw.get("trust", False))
    assert not failed
    assert [r["source"] for r in results] == [str(p) for p in paths]
    got = _probs(results, labels)
    # classify rounds to 6 decimals: agreement within 1e-4 is the contract
    assert np.abs(got - ref).max() < 1e-4
    assert [r["label"] for r in results] == [labels[i] for i in ref.argmax(1)]


def test_torchscript_agrees_with_demo_and_reads_metadata(tmp_path, reference):
    labels = [f"digit-{i}" for i in range(10)]
    ts = export_torchscript(tmp_path / "digits.pt", labels=labels)
    _agree(f"torchscript:{ts}", reference, labels=labels)
    clf = load_classifier(f"torchscript:{ts}", ClassifierOptions())
    assert clf.input_size == (16, 16) and "gradients" in clf.capabilities


def test_python_factory_with_safetensors_agrees(reference):
    _agree(f"python:cfx_cli.demo.classifier:DigitsCNN@{WEIGHTS}#size=16", reference)


def test_python_factory_from_a_file_with_normalization_options(tmp_path, reference):
    # A model that expects ImageNet-style normalized inputs; mean/std options undo it exactly.
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import torch
        from safetensors.torch import load_file
        from cfx_cli.demo.classifier import DigitsCNN

        class Normalized(torch.nn.Module):
            labels = [str(i) for i in range(10)]
            input_size = (16, 16)
            def __init__(self):
                super().__init__()
                self.net = DigitsCNN()
            def forward(self, z):  # z = (x - 0.25) / 2  →  x = 2 z + 0.25
                return self.net(2 * z + 0.25)

        def build():
            return Normalized()
    """))
    from safetensors.torch import load_file, save_file

    save_file({f"net.{k}": v for k, v in load_file(str(WEIGHTS)).items()}, str(tmp_path / "w.safetensors"))
    _agree(f"python:{tmp_path / 'mymodel.py'}:build@{tmp_path / 'w.safetensors'}#mean=0.25&std=2", reference)


def test_resize_then_centre_crop_is_the_classifiers_own_preprocessing(tmp_path):
    """#resize=N&size=S: the short side to N, then the centre S×S crop (torchvision's Resize + CenterCrop),
    differentiably inside the white-box call; the model sees S×S only."""
    import torch

    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import torch

        class Probe(torch.nn.Module):
            labels = ["a", "b"]
            seen = []
            def forward(self, x):
                self.seen.append(tuple(x.shape[-2:]))
                return torch.stack([x.mean((1, 2, 3)), x[:, :, 0, 0].mean(1)], 1)

        def build():
            return Probe()
    """))
    clf = load_classifier(f"python:{tmp_path / 'probe.py'}:build#resize=24&size=20", ClassifierOptions())
    images = torch.rand(2, 3, 30, 45, requires_grad=True)  # 30×45 → 24×36 → rows 2..22, columns 8..28
    out = clf.logits(images)
    want = torch.nn.functional.interpolate(images, size=(24, 36), mode="bilinear", align_corners=False,
                                           antialias=True)[..., 2:22, 8:28]
    torch.testing.assert_close(out, torch.stack([want.mean((1, 2, 3)), want[:, :, 0, 0].mean(1)], 1))
    assert clf.module.seen[-1] == (20, 20)
    (grad,) = torch.autograd.grad(out.sum(), images)
    assert float(grad.abs().sum()) > 0
    with pytest.raises(UsageError, match=r"#resize=16 needs #size=N with N ≤ 16"):
        load_classifier(f"python:{tmp_path / 'probe.py'}:build#resize=16&size=20", ClassifierOptions())


def test_pickled_checkpoints_need_trust_pickle(tmp_path, reference):
    import torch

    from cfx_cli.demo.classifier import load_pretrained

    full = tmp_path / "full_model.pt"
    torch.save(load_pretrained(), full)
    with pytest.raises(UsageError) as err:
        load_classifier(f"torchscript:{full}", ClassifierOptions())
    msg = str(err.value)
    assert str(full) in msg and "--trust-pickle" in msg and "safetensors" in msg and "arbitrary code" in msg
    _agree(f"torchscript:{full}#size=16", reference, trust=True)
    # a plain state dict in .pt form is tensors only: weights_only=True reads it without trust
    sd = tmp_path / "state.pt"
    torch.save(load_pretrained().state_dict(), sd)
    _agree(f"python:cfx_cli.demo.classifier:DigitsCNN@{sd}#size=16", reference)


def test_bad_specs_are_one_line_usage_errors(tmp_path):
    for spec, needle in [
        (f"torchscript:{tmp_path / 'missing.pt'}", "no such file"),
        ("python:no_such_module_xyz:build", "cannot import module"),
        ("python:cfx_cli.demo.classifier:nope", "no callable"),
        (f"python:cfx_cli.demo.classifier:DigitsCNN@{WEIGHTS}#size=16&colour=red", "unknown option"),
        ("python:cfx_cli.demo.classifier:DigitsCNN#size=abc", "size"),
        ("cmd:", "no command"),
        ("cmd:/no/such/program-xyz", "command not found"),
    ]:
        with pytest.raises(UsageError) as err:
            load_classifier(spec, ClassifierOptions())
        assert needle in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))


onnx_needed = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="needs the onnx and onnxruntime packages (dev extra)")


@onnx_needed
def test_onnx_probabilities_with_metadata_labels(tmp_path, reference):
    labels = [f"d{i}" for i in range(10)]
    path = export_onnx(tmp_path / "digits_softmax.onnx", softmax=True, labels=labels)
    _agree(f"onnx:{path}", reference, labels=labels)
    clf = load_classifier(f"onnx:{path}", ClassifierOptions())
    assert clf.input_size == (16, 16) and clf.capabilities == frozenset({"probabilities"})


@onnx_needed
def test_onnx_logits_are_softmaxed_only_when_told(tmp_path, reference):
    path = export_onnx(tmp_path / "digits_logits.onnx", softmax=False)
    _agree(f"onnx:{path}#logits=1", reference)
    paths, _ = reference
    results, failed = classify_inputs([str(paths[0])], f"onnx:{path}", None, "cpu", 4, False)
    assert failed and "logits" in results[0]["error"] and "probabilities" in results[0]["error"]


@onnx_needed
def test_onnx_nhwc_layout_is_read_from_the_model(tmp_path, reference):
    import warnings

    import torch

    from cfx_cli.demo.classifier import load_pretrained

    class Nhwc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = load_pretrained()

        def forward(self, x):
            return torch.softmax(self.net(x.permute(0, 3, 1, 2)), dim=1)

    path = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Nhwc().eval(), (torch.rand(1, 16, 16, 3),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    clf = load_classifier(f"onnx:{path}", ClassifierOptions())
    assert clf.layout == "NHWC" and clf.input_size == (16, 16)
    _agree(f"onnx:{path}", reference)


def test_cmd_agrees_with_demo(tmp_path, reference):
    prog = write_cmd_program(tmp_path)
    _agree(f"cmd:{sys.executable} {prog}#batch_size=3", reference)


# ---------------------------------------------------------------- cmd: failures (a stub program, no torch)
STUB = '''
import json, os, sys, time
MARK = sys.argv[1]
n = 0
for line in sys.stdin:
    k = len(json.loads(line)["images"])
    n += 1
    mode = open(MARK).read().strip() if os.path.exists(MARK) else ""
    if k and mode == "crash-once":
        os.remove(MARK)
        print("boom: out of memory", file=sys.stderr, flush=True)
        sys.exit(3)
    if k and mode == "crash":
        print("boom: segfault in model", file=sys.stderr, flush=True)
        sys.exit(4)
    if k and mode == "hang":
        print("stuck", file=sys.stderr, flush=True)
        time.sleep(60)
    if k and mode == "error":
        print(json.dumps({"error": "GPU out of memory"}), flush=True)
        continue
    if k and mode == "garbage":
        print("debug: this is not JSON", flush=True)
        continue
    print(json.dumps({"probabilities": [[0.25, 0.75]] * k, "labels": ["cat", "dog"]}), flush=True)
'''


@pytest.fixture
def stub(tmp_path):
    prog = tmp_path / "stub.py"
    prog.write_text(STUB)
    mark = tmp_path / "mode"
    clf = load_classifier(f"cmd:{sys.executable} {prog} {mark}#timeout=1.5&restarts=2", ClassifierOptions())
    yield clf, mark
    clf.close()


def _x(n=2):
    import torch

    return torch.rand(n, 3, 8, 8)


def test_cmd_labels_from_protocol_and_crash_restart(stub):
    clf, mark = stub
    assert clf.labels == ["cat", "dog"] and clf.label_index("dog") == 1
    assert clf.predict_proba(_x()).tolist() == [[0.25, 0.75]] * 2
    pid = clf._proc.popen.pid
    mark.write_text("crash-once")
    assert clf.predict_proba(_x(3)).shape == (3, 2)  # restarted, batch retried
    assert clf.restarts == 1 and clf._proc.popen.pid != pid


def test_cmd_crash_loops_are_bounded_and_quote_stderr(stub):
    clf, mark = stub
    mark.write_text("crash")
    with pytest.raises(ClassifierError) as err:
        clf.predict_proba(_x())
    assert "exited with code 4" in str(err.value) and "boom: segfault in model" in str(err.value)
    with pytest.raises(ClassifierError) as err:
        clf.predict_proba(_x())
    assert "not restarting" in str(err.value) and clf.restarts == 2
    with pytest.raises(ClassifierError):
        clf.predict_proba(_x())  # still refused, no new process
    assert clf.restarts == 2


def test_cmd_hang_times_out_then_restarts(stub):
    import time

    clf, mark = stub
    mark.write_text("hang")
    t0 = time.monotonic()
    with pytest.raises(ClassifierError) as err:
        clf.predict_proba(_x())
    assert time.monotonic() - t0 < 30  # returns after the 1.5 s timeout instead of hanging (bound: loaded machines)
    assert "no answer within 1.5s" in str(err.value) and "stuck" in str(err.value)
    mark.write_text("")
    assert clf.predict_proba(_x()).shape == (2, 2) and clf.restarts == 1


def test_cmd_error_answers_and_garbage(stub):
    clf, mark = stub
    mark.write_text("error")
    with pytest.raises(ClassifierError, match="GPU out of memory"):
        clf.predict_proba(_x())
    mark.write_text("garbage")
    with pytest.raises(ClassifierError, match="not JSON.*debug: this is not JSON"):
        clf.predict_proba(_x())
    mark.write_text("")
    assert clf.predict_proba(_x()).shape == (2, 2)


def test_cmd_start_up_failure_quotes_stderr(tmp_path):
    prog = tmp_path / "broken.py"
    prog.write_text("import sys\nprint('ImportError: no module named mymodel', file=sys.stderr)\n"
                    "sys.exit(1)\n")
    with pytest.raises(UsageError) as err:
        load_classifier(f"cmd:{sys.executable} {prog}", ClassifierOptions())
    assert "exited with code 1" in str(err.value) and "no module named mymodel" in str(err.value)


# ---------------------------------------------------------------- CLI: classify and explain (pgd, white-box)
@pytest.mark.slow
def test_cli_classify_json_and_table_with_torchscript(tmp_path, cfx, demo_images, reference):
    ts = export_torchscript(tmp_path / "digits.pt")
    res = cfx("classify", str(demo_images), "--classifier", f"torchscript:{ts}", "--format", "json", env=ONE)
    assert res.returncode == 0, res.stderr
    got = _probs(json.loads(res.stdout))
    assert np.abs(got - reference[1]).max() < 1e-4
    # the table shows each input's name in full however long the folder and however narrow the terminal
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6)
    deep.mkdir(parents=True)
    (deep / "digit-07-label7.png").write_bytes((demo_images / "digit-07-label7.png").read_bytes())
    assert len(str(deep)) > 120
    for columns in ("40", "80", "200"):
        res = cfx("classify", str(deep / "digit-07-label7.png"), "-c", f"torchscript:{ts}",
                  env={**ONE, "COLUMNS": columns})
        assert res.returncode == 0, res.stderr
        row = next(line for line in res.stdout.splitlines() if "digit-07-label7.png" in line)
        assert row.split("│")[2].strip() == "7", res.stdout
        folder_line = res.stdout.splitlines()[0]
        assert folder_line.startswith("in ") and folder_line.endswith(str(deep)[-20:]), res.stdout


@pytest.mark.slow
def test_whitebox_adapters_explain_with_pgd_like_demo(tmp_path, demo_images):
    from cfx_cli.explain.pipeline import run_explain
    from cfx_cli.explain.request import ExplainRequest

    ts = export_torchscript(tmp_path / "digits.pt")
    runs = {}
    for name, spec in [("demo", "demo:digits"), ("ts", f"torchscript:{ts}"),
                       ("py", f"python:cfx_cli.demo.classifier:DigitsCNN@{WEIGHTS}#size=16")]:
        out = tmp_path / name
        req = ExplainRequest(inputs=[str(demo_images)], method="pgd", classifier=spec, out=str(out),
                             device="cpu", set_options={"preset": "digits", "iterations": 20}, batch_size=16)
        summary = run_explain(req)
        assert summary.exit_code == 0
        runs[name] = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert json.loads((out / "run.json").read_text())["classifier"]["capabilities"] == [
            "gradients", "probabilities"]
    demo = {r["id"]: r for r in runs["demo"]}
    assert len(demo) == 16 and sum(r["status"] == "flipped" for r in demo.values()) >= 8
    for name in ("ts", "py"):
        assert len(runs[name]) == 16
        for rec in runs[name]:
            ref = demo[rec["id"]]
            assert rec["status"] == ref["status"] and rec["cf_label"] == ref["cf_label"]
            assert abs(rec["target_prob_after"] - ref["target_prob_after"]) < 1e-4
