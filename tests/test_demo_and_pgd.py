"""The embedded demo classifier and the pgd baseline on the demo folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cfx

from cfx_cli.demo import DEMO_DIR, IMAGES_DIR


def test_demo_classifier_held_out_accuracy_matches_model_card():
    from cfx_cli.demo.classifier import load_pretrained
    from cfx_cli.demo.data import load_split

    _, _, x_te, y_te = load_split()
    with torch.no_grad():
        pred = load_pretrained()(torch.from_numpy(x_te)).argmax(1).numpy()
    acc = float((pred == y_te).mean())
    card = json.loads((DEMO_DIR / "digits_classifier.json").read_text())
    assert acc >= 0.97
    assert abs(acc - card["held_out_accuracy"]) < 1e-3  # the card states the measured number
    assert f"{100 * card['held_out_accuracy']:.2f}%" in (DEMO_DIR / "MODEL_CARD.md").read_text()


def test_demo_images_are_classified_correctly():
    proc = run_cfx("classify", str(IMAGES_DIR), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == 16
    for r in results:
        true_label = r["source"].rsplit("label", 1)[1][0]
        assert r["label"] == true_label
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4


@pytest.mark.slow
def test_pgd_flips_the_demo_folder_and_eval_reports_it(tmp_path):
    out = tmp_path / "run"
    proc = run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--target", "auto", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "explain (pgd): 16/16 (100%)" in proc.stderr  # plain progress lines when not on a terminal
    assert "16 inputs: 16 flipped" in proc.stdout or "16 inputs: 15 flipped" in proc.stdout
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    flipped = sum(r["status"] == "flipped" for r in recs)
    assert len(recs) == 16 and flipped / 16 >= 0.95
    for r in recs:  # the attack stays in its ℓ∞ ball (preset digits: 32/255), up to PNG rounding
        from PIL import Image

        diff = np.abs(np.asarray(Image.open(out / r["counterfactual"]), dtype=float)
                      - np.asarray(Image.open(out / r["original"]), dtype=float))
        assert diff.max() <= 32 + 1

    proc = run_cfx("eval", str(out), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["flip_rate"] == flipped / 16 and row["n"] == 16
    assert 0 < row["l1"] < row["l2"] < 32 / 255 + 1e-3 and row["nfe"] == 50


def test_fixed_target_and_skipped_inputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--target", "3", "--out", str(out),
                   "--set", "iterations=10")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r["status"] == "skipped"]
    assert {r["source_label"] for r in skipped} == {"3"} and len(skipped) == 2
    assert all(r["counterfactual"] is None for r in skipped)
    assert all(r["target_label"] == "3" for r in recs)


def test_mask_restricts_the_attack(tmp_path):
    from PIL import Image

    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    out = tmp_path / "run"
    proc = run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--limit", "3", "--mask",
                   str(tmp_path / "left.png"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()):
        cf = np.asarray(Image.open(out / r["counterfactual"]), dtype=int)
        orig = np.asarray(Image.open(out / r["original"]), dtype=int)
        assert (cf[:, 8:] == orig[:, 8:]).all()  # nothing outside the mask changed
        assert r["mask"] and (out / r["mask"]).exists()


def test_eval_formats_and_side_by_side(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, it in ((a, "5"), (b, "20")):
        assert run_cfx("explain", str(IMAGES_DIR), "--method", "pgd", "--limit", "4", "--out", str(out),
                       "--set", f"iterations={it}").returncode == 0
    table = run_cfx("eval", str(a), str(b))
    assert table.returncode == 0
    header = next(line for line in table.stdout.splitlines() if "metric" in line)
    assert " a " in header + " " and " b " in header + " "
    csv = run_cfx("eval", str(a), str(b), "--format", "csv", "--output", str(tmp_path / "e.csv"))
    assert csv.returncode == 0
    lines = (tmp_path / "e.csv").read_text().splitlines()
    assert lines[0].startswith("run,n,flipped,flip_rate") and len(lines) == 3
    data = json.loads(run_cfx("eval", str(a), str(b), "--format", "json").stdout)
    assert data["runs"][0]["nfe"] == 5 and data["runs"][1]["nfe"] == 20
    bad = run_cfx("eval", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "no such directory" in bad.stderr
    unknown = run_cfx("eval", str(a), "--metrics", "fid_typo")
    assert unknown.returncode == 2 and "unknown metric 'fid_typo'" in unknown.stderr
