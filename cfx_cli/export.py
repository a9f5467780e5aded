"""``cfx export --layout ace``: a run directory in the folder layout of the ACE/DiME evaluation scripts, and
reading such a folder back for ``cfx eval --layout ace``.

The layout (ACE ``guided_diffusion/sample_utils.py`` ImageSaver; read by ``compute_FID.sh``,
``compute_sFID.sh``, ``compute_COUT.py``, ``compute_SimSiamSimilarity.py``, ``compute_FVA.py``,
``compute_MNAC.py``, ``compute_CD.py``, ``compute_LPIPS.py``)::

    OUT/Original/{Correct,Incorrect}/0000000.png             the input
    OUT/Results/EXP/{CC,IC}/{CCF,ICF}/CF/0000000.png         its counterfactual
    OUT/Results/EXP/{CC,IC}/{CCF,ICF}/SM/0000000.png         mask (or |x − x_cf| map scaled to 255)
    OUT/Results/EXP/{CC,IC}/{CCF,ICF}/Info/0000000.txt       label, pred, target, cf pred, l_inf, l_1
    OUT/Results/EXP/{CC,IC}/{CCF,ICF}/Noise/                 (ACE's noise images; left empty)

CC/IC: the classifier was correct/incorrect on the input; CCF/ICF: the counterfactual reached the target or
not. cfx runs have no ground-truth labels, so the prediction stands in for the label: every input is "CC"
and its original goes to ``Original/Correct``. ``OUT/cfx-export.json`` maps file names back to cfx ids
and keeps the class names and classifier spec for reading the folder back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cfx_cli.errors import UsageError

CLASSES = ("CC", "IC")
OUTCOMES = ("CCF", "ICF")
SUBFOLDERS = ("CF", "Noise", "Info", "SM")
EXPORT_JSON = "cfx-export.json"


def _index(labels: list[str], name: str | None) -> int:
    if name in labels:
        return labels.index(name)
    if name is not None and str(name).lstrip("-").isdigit():
        return int(name)
    raise UsageError(f"label {name!r} is not a class of the run's classifier")


def export_ace(run_dir: str | Path, out: str | Path, experiment: str | None = None,
               overwrite: bool = False) -> tuple[Path, int]:
    from PIL import Image

    from cfx_cli.images import safe_child
    from cfx_cli.runs import RunData, write_json_atomic

    run = RunData.load(run_dir)
    out = Path(out)
    exp = experiment or run.info.get("method") or run.name
    if "/" in exp or exp in ("", ".", ".."):
        raise UsageError(f"--experiment {exp!r}: must be a plain folder name")
    exp_dir = out / "Results" / exp
    if exp_dir.exists():
        if not overwrite:
            raise UsageError(f"{exp_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(exp_dir)
    labels = list((run.info.get("classifier") or {}).get("labels") or [])
    for folder in ("Correct", "Incorrect"):
        (out / "Original" / folder).mkdir(parents=True, exist_ok=True)
    for cl in CLASSES:
        for oc in OUTCOMES:
            for sub in SUBFOLDERS:
                (exp_dir / cl / oc / sub).mkdir(parents=True, exist_ok=True)
    recs = sorted(run.explained(), key=lambda r: r["id"])
    ids = {}
    for i, rec in enumerate(recs):
        name = f"{i:07d}"
        ids[name] = rec["id"]
        src, tgt, cfl = (_index(labels, rec[k]) for k in ("source_label", "target_label", "cf_label"))
        oc = "CCF" if rec["status"] == "flipped" else "ICF"
        folder = exp_dir / "CC" / oc
        orig_src = safe_child(run.path, rec["original"])
        orig_dst = out / "Original" / "Correct" / f"{name}.png"
        if orig_dst.exists() and orig_dst.read_bytes() != orig_src.read_bytes():
            raise UsageError(f"{orig_dst} holds a different original (another run's inputs?); "
                             "export into an empty folder")
        shutil.copyfile(orig_src, orig_dst)
        shutil.copyfile(safe_child(run.path, rec["counterfactual"]), folder / "CF" / f"{name}.png")
        x, cf = run.image(rec["original"]), run.image(rec["counterfactual"])
        if rec.get("mask"):
            shutil.copyfile(safe_child(run.path, rec["mask"]), folder / "SM" / f"{name}.png")
        else:  # ACE's fallback: Σ_c |x − x_cf| scaled to [0, 255]
            d = np.abs(x - cf).sum(axis=2)
            d = (255 * d / d.max()) if d.max() > 0 else d
            sm = np.repeat(d[..., None], 3, axis=2).astype(np.uint8)
            Image.fromarray(sm).save(folder / "SM" / f"{name}.png")
        diff = np.abs(x - cf)
        (folder / "Info" / f"{name}.txt").write_text(
            f"label: {src}\npred: {src}\ntarget: {tgt}\ncf pred: {cfl}\n"
            f"l_inf: {float(diff.max())}\nl_1: {float(diff.mean())}", encoding="utf-8")
    meta_path = out / EXPORT_JSON
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {"experiments": {}}
    meta["experiments"][exp] = {"run": str(run.path), "classifier": run.info.get("classifier"),
                                "labels": labels, "ids": ids, "device_name": run.info.get("device_name")}
    write_json_atomic(meta_path, meta)
    return exp_dir, len(recs)


def _read_info(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def load_ace(folder: str | Path) -> list:
    """One :class:`RunData` per ``Results/EXP`` of an ACE-layout folder (written by cfx or by ACE/DiME)."""
    from cfx_cli.images import load_png
    from cfx_cli.runs import RunData

    root = Path(folder)
    results = root / "Results"
    if not results.is_dir() or not (root / "Original").is_dir():
        raise UsageError(f"{root}: not an ACE-layout folder (expected Original/ and Results/EXP/)")
    meta_path = root / EXPORT_JSON
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {"experiments": {}}
    runs = []
    for exp_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        emeta = meta["experiments"].get(exp_dir.name, {})
        labels = emeta.get("labels") or []
        ids = emeta.get("ids") or {}

        def name_of(i: str, _labels=labels) -> str:
            k = int(i)
            return _labels[k] if 0 <= k < len(_labels) else str(k)

        records = []
        for cl in CLASSES:
            for oc in OUTCOMES:
                cf_dir = exp_dir / cl / oc / "CF"
                if not cf_dir.is_dir():
                    continue
                for cf in sorted(cf_dir.iterdir()):
                    if cf.name.startswith("."):
                        continue
                    orig = root / "Original" / ("Correct" if cl == "CC" else "Incorrect") / cf.name
                    if not orig.exists():
                        raise UsageError(f"{cf}: no original {orig}")
                    info_path = cf_dir.parent / "Info" / (cf.stem + ".txt")
                    info = _read_info(info_path) if info_path.exists() else {}
                    sm = cf_dir.parent / "SM" / cf.name
                    mask = None
                    if sm.exists():
                        m = load_png(sm)
                        # binary: a region mask, not a saliency map
                        if np.isin(np.round(m * 255), (0, 255)).all():
                            mask = sm.relative_to(root).as_posix()
                    records.append({
                        "id": ids.get(cf.stem, cf.stem), "source": str(orig), "status":
                        "flipped" if oc == "CCF" else "not_flipped", "error": None,
                        "source_label": name_of(info["pred"]) if "pred" in info else None,
                        "source_prob": None,
                        "target_label": name_of(info["target"]) if "target" in info else None,
                        "target_prob_before": None, "target_prob_after": None,
                        "cf_label": name_of(info["cf pred"]) if "cf pred" in info else None,
                        "counterfactual": cf.relative_to(root).as_posix(),
                        "original": orig.relative_to(root).as_posix(), "mask": mask, "params": None,
                        "seed": None, "seconds": None, "nfe": None,
                    })
        info = {"method": exp_dir.name, "layout": "ace", "classifier": emeta.get("classifier") or {},
                "device_name": emeta.get("device_name")}
        run = RunData(root, info, records)
        run.display_name = exp_dir.name  # type: ignore[attr-defined]
        runs.append(run)
    if not runs:
        raise UsageError(f"{root}: no experiments under Results/")
    return runs
