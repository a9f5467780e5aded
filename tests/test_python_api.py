"""``import cfx``: the Python API runs the CLI's own code path (same presets, seeds and files), stays light to
import, documents every argument, and its notebook example runs."""

from __future__ import annotations

import gc
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cfx

import cfx

ROOT = Path(__file__).resolve().parents[1]
IMAGES = cfx.demo_images(3)
HEAVY = ("torch", "numpy", "PIL", "diffusers", "transformers")


def counterfactual_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(run_dir) / "counterfactuals").glob("*.png"))}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``cfx explain`` of the three demo digits (a subprocess, as a user runs it), once per method per module."""
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp("cli") / method
            proc = run_cfx("explain", *map(str, IMAGES), "--method", method, "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            runs[method] = out
        return runs[method]

    return run


def test_import_cfx_imports_no_heavy_library():
    loaded = f"print([m for m in {HEAVY!r} if m in sys.modules])"
    code = f"import sys, cfx; {loaded}; cfx.methods(); {loaded}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # listing the methods loads the plugins (numpy), not torch
    assert proc.stdout.split("\n")[:2] == ["[]", "['numpy']"]


def test_public_functions_document_every_argument():
    assert sorted(cfx.__all__) == sorted(set(cfx.__all__))
    for name in cfx.__all__:
        obj = getattr(cfx, name)
        if name.startswith("__"):
            continue
        assert inspect.getdoc(obj), f"cfx.{name} has no docstring"
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            for param in inspect.signature(obj).parameters:
                assert f"{param}:" in doc, f"cfx.{name}: argument {param!r} is not documented"
            assert "return" in inspect.signature(obj).parameters or obj.__annotations__.get("return")


def test_methods_and_params_describe_the_registry():
    names = [m.name for m in cfx.methods()]
    assert {"pgd", "dime", "time"} <= set(names)
    dime = cfx.method("dime")
    assert dime.white_box and not cfx.method("time").white_box
    tau = next(p for p in dime.params if p.name == "tau")
    assert (tau.kind, tau.default, tau.bounds) == ("int", 60, ">= 1") and tau.help
    assert "digits" in dime.presets
    with pytest.raises(cfx.UsageError, match="nosuch"):
        cfx.method("nosuch")


def test_pgd_equals_the_cli_and_flips_with_the_automatic_preset(tmp_path, capsys, cli_run):
    cli = cli_run("pgd")
    res = cfx.explain(IMAGES, method="pgd", classifier="demo:digits", out=tmp_path / "api")
    assert "preset 'digits'" in capsys.readouterr().err  # the CLI's automatic preset, and its note
    assert [r.status for r in res] == ["flipped"] * 3  # the issue: PGD without the preset did not flip
    assert res.info["parameters"]["preset"] == "digits"
    assert counterfactual_bytes(tmp_path / "api") == counterfactual_bytes(cli)
    # the same pixels from PIL images and from a tensor batch (other ids; PGD draws no random numbers)
    from PIL import Image

    pil = [Image.open(p).convert("RGB") for p in IMAGES]  # convert(): no file name, so default ids
    import torch

    batch = torch.stack([cfx.load(cli)[i].original for i in range(3)])
    for images in (pil, batch):
        mem = cfx.explain(images, method="pgd")
        assert [r.id for r in mem] == ["image-000", "image-001", "image-002"]
        for a, b in zip(mem, cfx.load(cli), strict=True):
            assert torch.equal(a.counterfactual, b.counterfactual)
            assert a.target_label == b.target_label


def test_results_hold_records_images_grid_and_html(tmp_path):
    res = cfx.explain(IMAGES[:2], method="pgd")
    run_dir = res.run_dir
    r = res[0]
    assert r.id == "digit-00-label0" and r.record["id"] == r.id and r.source_label == "0"
    assert r.counterfactual.shape == (3, 16, 16) and 0 <= float(r.counterfactual.min()) <= 1
    assert r.counterfactual_image.size == (16, 16) and r.original.shape == (3, 16, 16)
    assert r.mask is None  # PGD without a region
    assert len(res) == 2 and res.counts == {"flipped": 2} and res.by_id("digit-01-label1") is res[1]
    grid = res.grid()
    assert grid.size == (3 * 96 + 8, 2 * 96 + 4)
    page = res._repr_html_()
    assert page.count("data:image/png;base64,") == 6 and "digit-01-label1" in page
    rows = cfx.evaluate(res, metrics="flip_rate,distance")
    assert rows[0]["flip_rate"] == 1.0 and rows[0]["l1"] > 0
    assert (run_dir / "eval.json").is_file()
    del res, r, page
    gc.collect()
    assert not run_dir.exists()  # the temporary run directory goes with the results


def test_a_torch_module_is_a_classifier_like_its_spec(tmp_path, cli_run):
    from cfx_cli.demo import LABELS
    from cfx_cli.demo.classifier import load_pretrained

    module = load_pretrained().train()
    clf = cfx.TorchClassifier(module, labels=LABELS, input_size=16)
    cli = cli_run("pgd")
    res = cfx.explain(IMAGES, method="pgd", classifier=clf, params={"preset": "digits"}, out=tmp_path / "m")
    assert counterfactual_bytes(tmp_path / "m") == counterfactual_bytes(cli)
    assert res.info["classifier"]["spec"].startswith("python:cfx._modules:")
    assert module.training and all(p.requires_grad for p in module.parameters())  # restored after the run
    assert cfx.evaluate(res, metrics="target_prob")[0]["target_prob_after"] > 0.5  # reloads the module
    by_spec = cfx.classify(IMAGES, classifier="demo:digits")
    by_module = cfx.classify([Image_open(p) for p in IMAGES], classifier=clf)
    assert [r["label"] for r in by_spec] == ["0", "1", "2"]
    assert [r["probabilities"] for r in by_spec] == [r["probabilities"] for r in by_module]
    plain = load_pretrained()  # a bare module: its labels / input_size attributes are read, as python: does
    plain.labels, plain.input_size = LABELS, (16, 16)
    assert [r["probabilities"] for r in cfx.classify(IMAGES, classifier=plain)] == [r["probabilities"] for r in by_spec]


def Image_open(path):  # noqa: N802 - PIL's name, imported when used
    from PIL import Image

    return Image.open(path)


def test_bad_inputs_are_one_line_usage_errors(tmp_path):
    with pytest.raises(cfx.UsageError, match="images: expected"):
        cfx.explain(42, method="pgd")
    with pytest.raises(cfx.UsageError, match="no parameter 'nosuch'"):
        cfx.explain(IMAGES, method="pgd", params={"nosuch": 1})
    with pytest.raises(cfx.UsageError, match="classifier: expected"):
        cfx.explain(IMAGES, method="pgd", classifier=3.5)
    import torch

    with pytest.raises(cfx.UsageError, match=r"\(N, 3, H, W\)"):
        cfx.explain(torch.zeros(2, 1, 8, 8), method="pgd")


@pytest.mark.slow
def test_dime_in_memory_inputs_equal_the_cli(tmp_path, cli_run):
    """DiME's noise depends on each image's seed, hence its id: PIL images opened from the files keep the file
    names, a tensor batch gets them from ``ids``; both give the CLI's PNGs byte for byte."""
    import torch
    from PIL import Image

    cli = cli_run("dime")  # paths: test_notebook_example_runs_and_equals_the_cli
    expected = cfx.load(cli)
    pil = cfx.explain([Image.open(p) for p in IMAGES], method="dime", out=tmp_path / "pil")
    assert [r.id for r in pil] == [r.id for r in expected]  # the names of the files they were opened from
    assert counterfactual_bytes(tmp_path / "pil") == counterfactual_bytes(cli)
    batch = torch.stack([r.original for r in expected])
    tensor = cfx.explain(batch, method="dime", ids=[p.stem for p in IMAGES])
    for a, b in zip(tensor, expected, strict=True):
        assert a.id == b.id and torch.equal(a.counterfactual, b.counterfactual)


@pytest.mark.slow
def test_notebook_example_runs_and_equals_the_cli(tmp_path, cli_run):
    env = {**os.environ, "CFX_EXAMPLE_OUT": str(tmp_path / "nb"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook.py")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dime {'flip_rate': " in proc.stdout and "time {'flip_rate': " in proc.stdout  # the metric table
    for method in ("dime", "time"):
        assert counterfactual_bytes(tmp_path / "nb" / method) == counterfactual_bytes(cli_run(method))
        assert (tmp_path / "nb" / f"{method}-grid.png").is_file()
        assert json.loads((tmp_path / "nb" / method / "eval.json").read_text())


def test_region_resume_and_labels_go_through_the_cli_options(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "run"
    res = cfx.explain(IMAGES[:2], method="pgd", region=str(tmp_path / "mask.png"), out=out,
                      labels=[f"d{i}" for i in range(10)], target="d8")
    r = res[0]
    assert r.mask.shape == (16, 16) and float(r.mask[0, 0]) == 0 and float(r.mask[8, 8]) == 1
    outside = (r.counterfactual - r.original).abs()[:, r.mask == 0]
    assert float(outside.max()) == 0  # the region is honoured: nothing outside it changes
    assert r.target_label == "d8" and res.info["mask"] == str(tmp_path / "mask.png")
    capsys.readouterr()
    again = cfx.explain(IMAGES, method="pgd", region=str(tmp_path / "mask.png"), out=out,
                        labels=[f"d{i}" for i in range(10)], target="d8", resume=True)
    assert "resuming: 2 of 3 inputs done, 1 to go" in capsys.readouterr().err  # as the CLI says it
    assert [x.id for x in again] == [p.stem for p in IMAGES]
    assert counterfactual_bytes(out)["digit-00-label0.png"] == (out / r.record["counterfactual"]).read_bytes()
    with pytest.raises(cfx.UsageError, match="exists"):
        cfx.explain(IMAGES, method="pgd", out=out)  # like the CLI: neither --resume nor --overwrite
