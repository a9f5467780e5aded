"""Make tests/fixtures/fastdime-e2e from the authors' FastDiME code (github.com/ppegiosk/FastDiME_CelebA).

The authors' ``main.py`` runs unchanged (its ``main()``: target choice, z_τ, the retries over λ_c, the 2-step
variants) with their ``core/`` package (``get_FastDiME_iterative_sampling``, ``generate_mask``,
``clean_class_cond_fn``, ``dist_cond_fn``, guided-diffusion's ``GaussianDiffusion`` / ``UNetModel``). Only the I/O
around it is replaced: the CelebA dataset by fixed images, the DenseNet by a tiny single-logit CNN, checkpoint
loading by ``torch.load`` of the adm-unet fixture's ``heads`` network, the device by the CPU, every random draw
(``torch.randn_like``) by the order-free constant noise of the dime-e2e README, and the imports that only the
replaced I/O needs (mpi4py, blobfile, pandas, albumentations, h5py, torchvision) by empty modules. Wrappers
around the authors' functions record what they return; nothing in the computation is re-implemented.

    git --git-dir=<mirror of ppegiosk/FastDiME_CelebA> archive 6d4a4eb | tar x -C /tmp/fastdime_celeba
    OMP_NUM_THREADS=1 python scripts/make_fastdime_fixture.py --code /tmp/fastdime_celeba
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

COMMIT = "6d4a4eba939d3e3678be6ead2347d5351efbc7e4"
REPO = Path(__file__).resolve().parents[1]
NOISE_SEED = 1234
CLASSIFIER_SEED = 0
CLASSIFIER_GAIN = 20.0
ADM_CONFIG = "heads"

# per case: the authors' --method and the main.py flags that differ from the scaled-down common ones below
CASES = [
    {"name": "case0", "method": "fastdime", "batch": 1, "image_seed": 11,
     "flags": {"start_step": 8, "warmup_step": 4, "classifier_scales": "40,300", "masking_threshold": 0.8,
               "dilation": 5, "use_logits": True}},
    {"name": "case1", "method": "fastdime2", "batch": 1, "image_seed": 12,
     "flags": {"start_step": 8, "warmup_step": 4, "classifier_scales": "40,300", "masking_threshold": 0.8,
               "dilation": 3, "use_logits": True}},
    {"name": "case2", "method": "fastdime2+", "batch": 1, "image_seed": 13,
     "flags": {"start_step": 10, "warmup_step": 5, "classifier_scales": "40,300", "masking_threshold": 0.75,
               "dilation": 5, "use_logits": False}},
]
COMMON = {"diffusion_steps": 500, "noise_schedule": "linear", "timestep_respacing": "25", "l1_loss": 0.05,
          "l2_loss": 0.0, "l_perc": 0.0, "l_perc_layer": 18, "use_sampling_on_x_t": True, "clip_denoised": True,
          "scale_grads": False, "guided_iterations": 9999999, "seed": 4, "query_label": 31, "target_label": -1,
          "use_ddim": False}


class TinyBinaryCNN(nn.Module):
    """The fixture's classifier (tests/fixtures/fastdime-e2e/classifier.py builds the same network)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 1)

    def forward(self, x):
        h = F.silu(self.c1(x))
        h = F.silu(self.c2(h))
        h = F.silu(self.c3(h))
        return self.fc(h.flatten(1))[:, 0]


def make_classifier() -> TinyBinaryCNN:
    torch.manual_seed(CLASSIFIER_SEED)
    net = TinyBinaryCNN()
    with torch.no_grad():
        net.fc.weight.mul_(CLASSIFIER_GAIN)
    return net.eval().requires_grad_(False)


def make_images(seed: int, n: int) -> torch.Tensor:
    """Smooth random images in [-1, 1] on the 8-bit grid (upsampled 8×8 noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return torch.round(img * 255) / 255 * 2 - 1


def constant_noise_tensor(seed: int, shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def stub_io_modules() -> None:
    """Empty modules for imports that only the replaced I/O uses (dataset readers, MPI, DenseNet/VGG)."""
    for name in ("mpi4py", "blobfile", "pandas", "albumentations", "h5py", "torchvision",
                 "torchvision.transforms", "torchvision.datasets", "torchvision.models"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["mpi4py"].MPI = getattr(sys.modules["mpi4py"], "MPI", types.SimpleNamespace())
    tv = sys.modules["torchvision"]
    for sub in ("transforms", "datasets", "models"):
        setattr(tv, sub, getattr(tv, sub, None) or sys.modules[f"torchvision.{sub}"])
    if not hasattr(tv.datasets, "ImageFolder"):
        tv.datasets.ImageFolder = object
    if not hasattr(tv.models, "vgg19"):
        def _no_vgg(*_a, **_k):
            raise RuntimeError("the fixture runs with l_perc = 0 (no VGG19 weights offline)")
        tv.models.vgg19 = _no_vgg


def load_authors(code: Path):
    stub_io_modules()
    sys.path.insert(0, str(code))
    spec = importlib.util.spec_from_file_location("fastdime_main", code / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    import core.sample_utils as sample_utils

    return main, sample_utils


class FixedImages:
    """Replaces CelebADataset: items (image, label, task label) as the authors' dataset returns them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], 0, 0


class Recorder(nn.Module):
    """The tiny classifier as main.py's ClassificationModel: records each call's input and output."""

    def __init__(self, net: nn.Module, log: list) -> None:
        super().__init__()
        self.net = net
        self.log = log

    def forward(self, x):
        out = self.net(x)
        self.log.append({"grad": torch.is_grad_enabled(), "x": x.detach().clone(), "logit": out.detach().clone()})
        return out


def run_case(main, sample_utils, case: dict, x: torch.Tensor, net: nn.Module, adm: Path, noise: torch.Tensor):
    """Run the authors' main() on images ``x`` with the case's flags; return what the wrappers recorded."""
    flags_cfg = json.loads((adm / "configs.json").read_text())[ADM_CONFIG]["flags"]
    flags = {**flags_cfg, **COMMON, **case["flags"], "method": case["method"], "batch_size": x.shape[0],
             "num_batches": 1, "save_images": False, "save_x_t": False, "save_z_t": False, "num_chunks": 1,
             "chunk": 0, "dataset": "CelebA", "image_size": 32, "self_optimized_masking": True}
    rec: dict = {"passes": [], "fixed_masks": [], "clf": [], "unet": {"calls": 0, "images": 0}, "draws": 0}

    def noise_like(t, *a, **k):  # every random draw: the same ε for every row
        rec["draws"] += 1
        assert tuple(t.shape[1:]) == tuple(noise.shape), t.shape
        return noise.expand(t.shape).clone().to(t.dtype)

    orig_sampling = main.get_FastDiME_iterative_sampling
    orig_gen_utils = sample_utils.generate_mask
    orig_gen_main = main.generate_mask
    orig_create = main.create_model_and_diffusion
    current: dict = {}

    def gen_in_loop(x1, x2, dilation):  # called inside p_sample_loop (self-optimised mask, every step ≥ warmup)
        mask, dil = orig_gen_utils(x1, x2, dilation)
        current.setdefault("masks", []).append(dil.clone())
        return mask, dil

    def gen_in_main(x1, x2, dilation):  # called by main() between the 2 passes (the fixed mask)
        mask, dil = orig_gen_main(x1, x2, dilation)
        rec["fixed_masks"].append(dil.clone())
        return mask, dil

    def sampling(use_sampling=False):
        fn = orig_sampling(use_sampling=use_sampling)

        def wrapped(diffusion, model, shape, num_timesteps, img, t, **kw):
            current.clear()
            cfs, xs, zs = fn(diffusion, model, shape, num_timesteps, img, t, **kw)
            fk = kw["fast_dime_kwargs"]
            rows = [int((x == im).flatten(1).all(1).nonzero()[0]) for im in img]
            rec["passes"].append({"rows": rows, "scale": kw["class_grad_kwargs"]["s"], "cf": cfs.clone(),
                                  "x_steps": [v.clone() for v in xs], "z_steps": [v.clone() for v in zs],
                                  "self_masks": current.get("masks", []),
                                  "fixed": fk["boolmask"] is not None,
                                  "fixed_boolmask": None if fk["boolmask"] is None else fk["boolmask"].clone()})
            return cfs, xs, zs

        return wrapped

    def create(**kw):
        model, diffusion = orig_create(**kw)

        def hook(_m, args, _o):
            rec["unet"]["calls"] += 1
            rec["unet"]["images"] += args[0].shape[0]

        model.register_forward_hook(hook)
        return model, diffusion

    def loader(dataset, **kw):
        return torch.utils.data.DataLoader(dataset, batch_size=kw["batch_size"], shuffle=False, num_workers=0)

    argv = ["main.py"] + [s for k, v in flags.items() for s in (f"--{k}", str(v))]
    with tempfile.TemporaryDirectory() as out:
        argv += ["--output_path", out, "--exp_name", case["name"]]
        patches = {
            (main, "CelebADataset"): lambda **_k: FixedImages(x),
            (main, "ClassificationModel"): lambda *_a, **_k: Recorder(net, rec["clf"]),
            (main, "dist_util"): types.SimpleNamespace(
                dev=lambda: "cpu", load_state_dict=lambda p, **_k: torch.load(adm / f"{ADM_CONFIG}.pt",
                                                                             weights_only=True)),
            (main, "data"): types.SimpleNamespace(DataLoader=loader),
            (main, "get_FastDiME_iterative_sampling"): sampling,
            (main, "generate_mask"): gen_in_main,
            (main, "create_model_and_diffusion"): create,
            (sample_utils, "generate_mask"): gen_in_loop,
            (torch, "randn_like"): noise_like,
            (sys, "argv"): argv,
        }
        saved = {key: getattr(*key) for key in patches}
        try:
            for (obj, name), value in patches.items():
                setattr(obj, name, value)
            with contextlib.redirect_stdout(sys.stderr):
                main.main()
        finally:
            for (obj, name), value in saved.items():
                setattr(obj, name, value)
    rec["flags"] = flags
    return rec


def nan_rows(n: int, rows: list[int], values: torch.Tensor, fill=float("nan")) -> torch.Tensor:
    out = torch.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    out[rows] = values
    return out


def trace_steps(case: dict, pass_index: int) -> list[int]:
    """Step indices (0 = before the first step) whose z_t / x_t the fixture keeps: after the first step, and
    (first pass) after the first self-masked step, where the mask first acts on z_t and x_t."""
    return [1] if pass_index else [1, case["flags"]["warmup_step"] + 1]


def case_tensors(case: dict, x: torch.Tensor, rec: dict, net: nn.Module, noise: torch.Tensor):
    """The fixture tensors of one case (B images) from the recording, plus the case's json entry."""
    k, n = case["name"], x.shape[0]
    thr = case["flags"]["masking_threshold"]
    two_pass = "2" in case["method"]
    t: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logit_x = net(x)
    t[f"{k}_x"], t[f"{k}_logit_x"], t[f"{k}_noise"] = x, logit_x, noise.clone()
    t[f"{k}_target"] = (1 - (logit_x > 0).long())
    per = 2 if two_pass else 1
    assert len(rec["passes"]) % per == 0
    attempts = [rec["passes"][i:i + per] for i in range(0, len(rec["passes"]), per)]
    # the no-grad classifier calls: the first is the initial prediction, then one per attempt, then the final cf
    judged = [c for c in rec["clf"] if not c["grad"]]
    assert len(judged) == 1 + len(attempts) + 1, len(judged)
    t[f"{k}_z_tau"] = attempts[0][0]["z_steps"][0]
    observed = []
    final_attempt = torch.full((n,), -1, dtype=torch.long)
    for j, passes in enumerate(attempts):
        rows = passes[0]["rows"]
        logit = judged[1 + j]["logit"]
        target = t[f"{k}_target"][rows]
        flipped = ((logit > 0).long() == target).long()
        for p_i, p in enumerate(passes):
            pre = f"{k}_attempt{j}_pass{p_i}"
            t[f"{pre}_cf"] = nan_rows(n, rows, p["cf"])
            # boolmask of the pass (1 = the input is kept): the last self-optimised one, or the fixed one
            if p["fixed"]:
                keep = p["fixed_boolmask"]
            elif p["self_masks"]:
                keep = (p["self_masks"][-1] < thr).float()
            else:
                keep = None
            if keep is not None:
                t[f"{pre}_keep"] = nan_rows(n, rows, keep.to(torch.int8), -1)
            if j == 0:  # z_t and x_t at the start of a few steps of the first attempt (the file stays small)
                for idx in trace_steps(case, p_i):
                    t[f"{pre}_z_step{idx}"] = nan_rows(n, rows, p["z_steps"][idx])
                    t[f"{pre}_x_step{idx}"] = nan_rows(n, rows, p["x_steps"][idx])
        t[f"{k}_attempt{j}_logit"] = nan_rows(n, rows, logit)
        t[f"{k}_attempt{j}_flipped"] = nan_rows(n, rows, flipped, -1)
        final_attempt[rows] = j
        observed.append({"classifier_scale": passes[0]["scale"], "images": rows,
                         "flipped": [bool(v) for v in flipped], "logit": [float(v) for v in logit],
                         "kept_fraction": [float(t[f"{k}_attempt{j}_pass{len(passes) - 1}_keep"][r].float().mean())
                                           if f"{k}_attempt{j}_pass{len(passes) - 1}_keep" in t else None
                                           for r in rows]})
    cf = judged[-1]["x"]
    t[f"{k}_cf"] = cf
    t[f"{k}_logit_cf"] = judged[-1]["logit"]
    t[f"{k}_attempt_of_cf"] = final_attempt
    t[f"{k}_flipped"] = ((judged[-1]["logit"] > 0).long() == t[f"{k}_target"]).long()
    grads = [c for c in rec["clf"] if c["grad"]]
    entry = {"name": k, "method": case["method"], "batch": n, "noise_seed": NOISE_SEED,
             "image_seed": case["image_seed"],
             "cli_flags": {key: rec["flags"][key] for key in
                           (*COMMON, "start_step", "warmup_step", "classifier_scales", "masking_threshold",
                            "dilation", "use_logits", "self_optimized_masking")},
             "unet": {"fixture": "adm-unet", "config": ADM_CONFIG},
             "observed": {"attempts": observed, "unet_evaluations": rec["unet"],
                          "classifier_gradient_calls": sum(c["x"].shape[0] for c in grads),
                          "random_draws": rec["draws"]},
             "tensors": sorted(t)}
    return t, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", type=Path, required=True, help=f"checkout of ppegiosk/FastDiME_CelebA at {COMMIT}")
    ap.add_argument("--adm", type=Path, default=REPO.parent / "shared" / "fixtures" / "adm-unet")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "fastdime-e2e")
    args = ap.parse_args()
    torch.set_num_threads(1)
    main_mod, sample_utils = load_authors(args.code.resolve())
    net = make_classifier()
    noise = constant_noise_tensor(NOISE_SEED, (3, 32, 32))
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for case in CASES:
        x = make_images(case["image_seed"], case["batch"])
        rec = run_case(main_mod, sample_utils, case, x, net, args.adm.resolve(), noise)
        t, entry = case_tensors(case, x, rec, net, noise)
        tensors.update(t)
        entries.append(entry)
        print(case["name"], json.dumps(entry["observed"]), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "tensors.safetensors"))
    save_file(dict(net.state_dict()), str(args.out / "classifier.safetensors"))
    adm_pt = args.adm / f"{ADM_CONFIG}.pt"
    meta = {"method": "FastDiME", "code": {"repository": "github.com/ppegiosk/FastDiME_CelebA", "commit": COMMIT},
            "maker": "scripts/make_fastdime_fixture.py",
            "network": {"fixture": "adm-unet", "config": ADM_CONFIG,
                        "sha256": hashlib.sha256(adm_pt.read_bytes()).hexdigest()},
            "classifier": {"seed": CLASSIFIER_SEED, "gain": CLASSIFIER_GAIN},
            "tolerance": {"float_max_abs": 1e-4, "integer": "exact"}, "cases": entries}
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    # the fixture's own check: what was written reads back
    back = load_file(str(args.out / "tensors.safetensors"))
    assert set(back) == set(tensors)
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:
        rev = "?"
    print(f"wrote {args.out} (cfx at {rev})", file=sys.stderr)


if __name__ == "__main__":
    main()
