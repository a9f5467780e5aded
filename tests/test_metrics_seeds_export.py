"""``cfx explain --seeds N`` and σ_L, background MSE, efficiency's hardware, ``cfx export --layout ace`` and
reading it back, and every metric on one demo run with random-weight networks."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from metric_weights import inception_file, lpips_files, simsiam_file, vggface2_file


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    from conftest import run_cfx

    from cfx_cli.demo import IMAGES_DIR

    root = tmp_path_factory.mktemp("seeds")
    mask = root / "mask.png"
    from cfx_cli.images import save_png

    m = np.zeros((16, 16), np.float32)
    m[2:14, 2:14] = 1  # 12×12 of 16×16: masked pgd still flips the first inputs
    save_png(m, mask)
    run = root / "run"
    proc = run_cfx(
        "explain",
        str(IMAGES_DIR),
        "--method",
        "pgd",
        "--out",
        str(run),
        "--limit",
        "6",
        "--seeds",
        "3",
        "--mask",
        str(mask),
        "--seed",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.slow
def test_seeds_layout(seeded_run):
    ids = None
    for k, d in enumerate([seeded_run, seeded_run / "seeds" / "1", seeded_run / "seeds" / "2"]):
        info = json.loads((d / "run.json").read_text())
        assert info["seed"] == 5 + k
        recs = [json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()]
        assert ids is None or ids == [r["id"] for r in recs]
        ids = [r["id"] for r in recs]
        assert all((d / r["counterfactual"]).exists() for r in recs)
    assert json.loads((seeded_run / "run.json").read_text())["seeds"] == 3


@pytest.mark.slow
def test_sigma_l_pairs_seeds_by_id(seeded_run, tmp_path, cfx):
    import torch

    from cfx_cli.images import load_png, save_png
    from cfx_plugins.nets import lpips

    trunk, lin = lpips_files(tmp_path)
    # pgd is deterministic: make seed 2's counterfactuals differ so the mean is over unequal pairs
    recs2 = [json.loads(x) for x in (seeded_run / "seeds" / "2" / "manifest.jsonl").read_text().splitlines()]
    for r in recs2[:2]:
        p = seeded_run / "seeds" / "2" / r["counterfactual"]
        save_png(np.clip(load_png(p)[::-1].copy(), 0, 1), p)
    proc = cfx(
        "eval",
        str(seeded_run),
        "--metrics",
        "sigma_l",
        "--format",
        "json",
        "--set",
        f"lpips_backbone={trunk}",
        "--set",
        f"lpips_weights={lin}",
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["sigma_l_seeds"] == 3 and row["sigma_l_inputs"] == 6
    model = lpips.load("vgg", trunk, lin)
    dirs = [seeded_run, seeded_run / "seeds" / "1", seeded_run / "seeds" / "2"]
    recs = [json.loads(x) for x in (seeded_run / "manifest.jsonl").read_text().splitlines()]
    per_input = []
    for r in recs:
        imgs = [
            torch.from_numpy(load_png(d / r["counterfactual"])).permute(2, 0, 1)[None].float() for d in dirs
        ]
        with torch.no_grad():
            per_input.append(np.mean([float(model(a, b)[0]) for a, b in combinations(imgs, 2)]))
    assert row["sigma_l"] == pytest.approx(float(np.mean(per_input)), rel=1e-5)
    assert row["sigma_l"] > 0
    # a run with one seed says how to get several
    single = json.loads(
        cfx("eval", str(seeded_run / "seeds" / "1"), "--metrics", "sigma_l", "--format", "json").stdout
    )["runs"][0]["skipped"]["sigma_l"]
    assert "--seeds N" in single


@pytest.mark.slow
def test_background_mse_and_hardware(seeded_run, tmp_path, cfx):
    from cfx_cli.images import load_png, save_png

    proc = cfx("eval", str(seeded_run), "--metrics", "bg_mse,efficiency", "--format", "json")
    row = json.loads(proc.stdout)["runs"][0]
    assert row["bg_mse"] == 0.0 and row["bg_mse_n"] == 6  # masked pgd leaves the background untouched
    assert row["hardware"].startswith("CPU")
    # change one counterfactual outside the mask by a known amount
    rec = json.loads((seeded_run / "manifest.jsonl").read_text().splitlines()[0])
    p = seeded_run / rec["counterfactual"]
    img = load_png(p)
    img[0, :, :] = np.clip(img[0, :, :] + 0.4, 0, 1)
    save_png(img, p)
    changed = load_png(p)
    orig = load_png(seeded_run / rec["original"])
    bg = np.ones((16, 16), bool)
    bg[2:14, 2:14] = False
    expected = ((changed - orig) ** 2).mean(axis=2)[bg].mean() / 6
    row = json.loads(cfx("eval", str(seeded_run), "--metrics", "bg_mse", "--format", "json").stdout)["runs"][
        0
    ]
    assert row["bg_mse"] == pytest.approx(expected, rel=1e-6) and expected > 0


@pytest.mark.slow
def test_export_ace_layout_and_read_back(tmp_path, cfx, demo_images):
    run = tmp_path / "run"
    assert (
        cfx("explain", str(demo_images), "--method", "pgd", "--out", str(run), "--limit", "5").returncode == 0
    )
    out = tmp_path / "ace"
    proc = cfx("export", str(run), "--layout", "ace", str(out))
    assert proc.returncode == 0, proc.stderr
    recs = sorted(
        (json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()), key=lambda r: r["id"]
    )
    exp = out / "Results" / "pgd"
    for i, r in enumerate(recs):
        name = f"{i:07d}"
        oc = "CCF" if r["status"] == "flipped" else "ICF"
        assert (out / "Original" / "Correct" / f"{name}.png").read_bytes() == (
            run / r["original"]
        ).read_bytes()
        assert (exp / "CC" / oc / "CF" / f"{name}.png").read_bytes() == (
            run / r["counterfactual"]
        ).read_bytes()
        assert (exp / "CC" / oc / "SM" / f"{name}.png").exists()
        info = (exp / "CC" / oc / "Info" / f"{name}.txt").read_text().splitlines()
        assert (
            info[0] == f"label: {int(r['source_label'])}" and info[2] == f"target: {int(r['target_label'])}"
        )
    for sub in ("CF", "Noise", "Info", "SM"):
        assert (exp / "IC" / "ICF" / sub).is_dir()
    assert cfx("export", str(run), "--layout", "ace", str(out)).returncode == 2  # exists: needs --overwrite
    # the folder read back scores like the run itself
    a = json.loads(cfx("eval", str(run), "--metrics", "distance,flip_rate,cout", "--format", "json").stdout)
    b = cfx("eval", str(out), "--layout", "ace", "--metrics", "distance,flip_rate,cout", "--format", "json")
    assert b.returncode == 0, b.stderr
    ra, rb = a["runs"][0], json.loads(b.stdout)["runs"][0]
    assert rb["run"] == "pgd" and rb["skipped"] == {}
    for col in ("l1", "l2", "flip_rate", "cout"):
        assert rb[col] == pytest.approx(ra[col], rel=1e-9)


@pytest.mark.slow
def test_every_metric_runs_on_a_demo_run(seeded_run, tmp_path, cfx):
    from cfx_cli.demo.data import load_split

    y = load_split()[1]
    rows = [",".join(str(k) for k in range(10))] + [
        ",".join("1" if k == v else "0" for k in range(10)) for v in y
    ]
    (tmp_path / "digits.csv").write_text("\n".join(rows) + "\n")
    trunk, lin = lpips_files(tmp_path)
    sets = {
        "inception_weights": inception_file(tmp_path / "inception.pth"),
        "simsiam_weights": simsiam_file(tmp_path / "simsiam.pth.tar"),
        "vggface2_weights": vggface2_file(tmp_path / "vggface2.pkl"),
        "lpips_backbone": trunk,
        "lpips_weights": lin,
        "oracle": "demo:digits",
        "oracle_query": "3",
        "correlations": tmp_path / "digits.csv",
        "sfid_splits": 3,
        "insdel_map": "ig",  # the demo run has no region source to take a saliency map from
        "insdel_steps": 16,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    proc = cfx("eval", str(seeded_run), "--metrics", "all", "--format", "json", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert row["skipped"] == {}, row["skipped"]
    for col in (
        "fid",
        "sfid",
        "sfid_std",
        "s3",
        "fs",
        "fva",
        "mnac",
        "cd",
        "cout",
        "sigma_l",
        "bg_mse",
        "seconds",
        "nfe",
        "hardware",
        "flip_rate",
        "l1",
        "ins_zero",
        "del_blur",
    ):
        assert row[col] is not None, col
    assert -1 <= row["s3"] <= 1 and 0 <= row["fva"] <= 1 and row["fid"] >= 0
