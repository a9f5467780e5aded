"""docs/reproduce.md's recipes, run end to end on random weights of the published layouts.

The commands come from the page itself (every ``<!-- recipe: NAME -->`` block), so the docs and this test cannot
drift. The only changes: the published files are random-weight files at the paths the page names (written once per
session in a temporary working folder, by bench/make_random_published.py and bench/make_random_sd.py --narrow;
the SD hub id resolves through a temporary Hugging Face cache), the ADM base width is narrowed
(``--num_channels 32``), every explain gets ``--limit 1`` and a shortened schedule through ``--set``. What this
catches: shape, resolution, preprocessing and memory bugs of the real configurations, and commands or flags on the
page that no longer exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cfx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

DOC = REPO / "docs" / "reproduce.md"
BLOCK = re.compile(r"<!-- (recipe|file): (\S+) -->\s*```(\w+)\n(.*?)```", re.S)
#: CFX_REPRO_FULL=1 keeps the published widths (ADM num_channels, SD 1.x's full UNet/VAE/text encoder): for a GPU
FULL = os.environ.get("CFX_REPRO_FULL") == "1"
NARROW = 32  # ADM base width for CPU runs (GroupNorm needs multiples of 32)
SD_HUB_ID = "CompVis/stable-diffusion-v1-4"
#: shortened schedules (recipe method → --set values), so each recipe runs in seconds on one CPU thread
SHORT = {
    "dime": ["tau=3", "scales=8"],
    "ace": ["iterations=1", "tau=2"],
    "time": ["schedule=1:4", "steps=10"],
    "rcsb": ["nfe=2", "region_steps=2", "region_samples=1"],
    "eced": ["iterations=1", "bg_iterations=1", "tau=2", "steps=10"],
}
FIT_SHORT = ["iterations=1", "batch_size=1", "micro_batch=1"]
EVAL_SHORT = {"cout": "cout_steps=2"}  # metric → the option that shortens it
#: random files for the published classifier-like files, by file name
CLASSIFIER_FILES = {"classifier.pth": "densenet-celeba", "checkpoint.tar": "densenet-celebahq",
                    "resnet50-0676ba61.pth": "resnet50", "vgg19-dcbb9e9d.pth": "vgg19", "oracle.pth": "oracle-celeba"}
#: native sizes (W, H) of the datasets' images, by folder prefix
DATA_SIZES = {"data/celeba/": (178, 218), "data/celebahq/": (1024, 1024), "data/imagenet/": (500, 375)}
#: the resolution each recipe's generator works at (the saved originals and counterfactuals)
GENERATOR_SIZE = {"dime-celeba": 128, "ace-celebahq": 256, "ace-imagenet": 256, "time-celebahq": 512,
                  "rcsb-imagenet": 256, "eced-celebahq": 512}


def parse_doc(text: str) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """(recipe name → its commands as argument lists, file name → the file's text)."""
    recipes, files = {}, {}
    for kind, name, _lang, body in BLOCK.findall(text):
        if kind == "file":
            files[name] = body
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        recipes[name] = [shlex.split(line) for line in joined.splitlines() if line.strip()]
    return recipes, files


RECIPES, FILES = parse_doc(DOC.read_text(encoding="utf-8"))


def _opt(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def _narrow(flags: str) -> str:
    if FULL:
        return flags
    narrowed, n = re.subn(r"--num_channels \d+", f"--num_channels {NARROW}", flags)
    assert n == 1, f"--model-flags without --num_channels: {flags}"
    return narrowed


def _make_image(path: Path, size: tuple[int, int], seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth random colours (a random-pixel image would be an unrealistically hard input for any resize)
    small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=95)


def _fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The Hugging Face cache layout (refs/main → snapshots/HASH) holding ``folder`` as ``repo_id``."""
    import shutil

    base = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A working folder laid out as the page assumes (models/, data/), every published file random."""
    from PIL import Image

    sys.path.insert(0, str(REPO / "bench"))
    from make_random_published import write_adm, write_classifier, write_i2sb
    from make_random_sd import build as build_sd

    work = tmp_path_factory.mktemp("reproduce")
    made = set()
    for commands in RECIPES.values():
        for cmd in commands:
            model = _opt(cmd, "--model") or ""
            if model.startswith("adm:") and model not in made:
                write_adm(work / model[4:], _narrow(_opt(cmd, "--model-flags")))
            elif model.startswith("i2sb:") and model not in made:
                ckpt = write_i2sb((work / model[5:]).parent, "" if FULL else f"--num_channels {NARROW}")
                sidecar = json.loads(ckpt.with_name("options.json").read_text())
                assert {k: v for k, v in sidecar.items() if k != "adm_flags"} == json.loads(FILES["options.json"])
            elif model == f"diffusers:{SD_HUB_ID}" and model not in made:
                _fake_hub_cache(work / "hub", SD_HUB_ID, build_sd(work / "sd-random", narrow=not FULL))
            made.add(model)
            for arg in cmd:
                for path in re.findall(r"(?:@|=|^)(models/[^#&\s]+)", arg):
                    name = Path(path).name
                    if name in CLASSIFIER_FILES and not (work / path).exists():
                        write_classifier(CLASSIFIER_FILES[name], work / path)
                if arg.startswith("data/") and not (work / arg).exists():
                    (work / arg).mkdir(parents=True)
                    size = next(s for prefix, s in DATA_SIZES.items() if arg.startswith(prefix))
                    if cmd[1] == "fit":  # black and white: no resize changes them, so their logits are known
                        for i in (0, 1):
                            Image.new("RGB", size, (255 * i,) * 3).save(work / arg / f"img{i}.png")
                    else:
                        _make_image(work / arg / "img0.jpg", size, seed=len(made))
            if cmd[1:3] == ["fit", "time"]:
                _split_predictions(work, _opt(cmd, "--classifier"), work / _opt(cmd, "--data"))
    return work


def _split_predictions(work: Path, spec: str, data: Path) -> None:
    """Set the random classifier's attribute row so that the fit's two training images (black, white) are
    predicted as different classes with logits ±1 (TIME learns class tokens only for predicted classes, and a
    random DenseNet's output barely depends on its input: ±1e-4 here)."""
    import numpy as np
    import torch
    from PIL import Image

    from cfx_plugins.nets.densenet import celebahq_densenet

    weights = work / spec.split("@", 1)[1].split("#", 1)[0]
    attribute = int(re.search(r"attribute=(\d+)", spec).group(1))
    ckpt = torch.load(weights, weights_only=True)
    net = celebahq_densenet().eval()
    net.load_state_dict(ckpt)
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((256, 256)))).permute(2, 0, 1)
                     for p in sorted(data.iterdir())]).float() / 255  # constant images: any resize is exact
    with torch.no_grad():
        feats = net.feat_extract((x - 0.5) / 0.5)
    f0, f1 = feats.double()
    w = 2 * (f0 - f1) / (f0 - f1).square().sum()  # w·f0 − w·f1 = 2
    state = ckpt["model_state_dict"]
    state["classifier.weight"][attribute] = w.float()
    state["classifier.bias"][attribute] = float(-w @ (f0 + f1) / 2)
    torch.save(ckpt, weights)


def _shortened(cmd: list[str]) -> list[str]:
    args = cmd[1:]
    if args[0] == "explain":
        args += ["--limit", "1"] + [x for kv in SHORT[_opt(cmd, "--method")] for x in ("--set", kv)]
    elif args[:2] == ["fit", "time"]:
        args += [x for kv in FIT_SHORT for x in ("--set", kv)]
    elif args[0] == "eval":
        metrics = (_opt(cmd, "--metrics") or "").split(",")
        args += [x for m, kv in EVAL_SHORT.items() if m in metrics for x in ("--set", kv)]
    if "--model-flags" in args:
        i = args.index("--model-flags") + 1
        args[i] = _narrow(args[i])
    return args


def test_every_recipe_is_tested():
    assert set(RECIPES) == set(GENERATOR_SIZE), "a recipe on docs/reproduce.md without an expected size here"
    for name, commands in RECIPES.items():
        assert commands and all(c[0] == "cfx" for c in commands), name
        assert any(c[1] == "explain" for c in commands) and any(c[1] == "eval" for c in commands), name


@pytest.mark.parametrize("recipe", sorted(GENERATOR_SIZE))
def test_recipe_runs_on_random_published_shapes(recipe, workdir):
    from PIL import Image

    env = {"HF_HUB_CACHE": str(workdir / "hub"), "HF_HUB_OFFLINE": "1"}
    for cmd in RECIPES[recipe]:
        args = _shortened(cmd)
        proc = run_cfx(*args, env=env, cwd=workdir, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if args[0] != "explain":
            continue
        run = workdir / _opt(args, "--out")
        records = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
        assert len(records) == 1 and records[0]["status"] != "error", records
        for key in ("original", "counterfactual"):
            size = Image.open(run / records[0][key]).size
            assert size == (GENERATOR_SIZE[recipe],) * 2, f"{recipe}: {key} saved at {size}"
    evals = [workdir / c[2] / "eval.json" for c in RECIPES[recipe] if c[1] == "eval"]
    for path in evals:
        assert "flip_rate" in path.read_text(), path
