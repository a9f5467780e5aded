"""The authors' TIME generation loop (github.com/guillaumejs2403/TIME, ``generate-ce.py``) on the time-xcheck inputs.

Run by ``scripts/crosscheck_time_reference.py`` in a Python environment with the authors' pinned libraries
(diffusers 0.16.1, transformers 4.26.1; torch from anywhere); it imports nothing of cfx. Usage:

    python scripts/_time_reference_run.py --time TIME_CHECKOUT --folder-eps SD --folder-v SD \\
        --xcheck tests/fixtures/time-xcheck --out reference.safetensors

What is the authors' code and what is the shim around it:

* theirs, unchanged: ``core.edict.EDICT`` (``Invert``/``Denoise``: VAE encode, EDICT inversion with the
  ``DDIMInverseScheduler``, guided EDICT denoising with the ``DDIMScheduler``, decode), ``core.utils``'s
  ``load_tokens_and_embeddings`` and ``generate_prompt`` (prompts from ``--base_prompt``/``--pos_custom_token``/
  ``--neg_custom_token``, dataset ``CelebAHQ``), ``core.dataset.celebahq_postprocessing``;
  the schedulers set up as ``generate-ce.py`` does (``DDIMInverseScheduler.from_config(scheduler.config)``).
* the shim: the pipeline is built from the folder's components (``EDICT(vae=..., ...)``; the tiny folder has
  no ``model_index.json``); the token files are written from the fixture's ``tokens.safetensors`` in the
  code's ``{"words", "embs"}`` format; the classifier's prediction is the fixture's ``sources`` (the code's
  ``c_pred``; target = 1 − prediction as for a binary dataset); ``pandas``/``torchvision`` (imported by
  ``core/dataset.py`` for its datasets only) are stubbed; the attempt loop of ``generate-ce.py`` is re-typed
  with a classifier that never flips, so every (τ, g) of the schedule runs on every image, with the call
  arguments of the README's command (``--use_negative_guidance_denoise --use_negative_guidance_inverse``, the
  same GS for inversion and denoising, ``l2`` 0, ``--total_num_inference_steps`` and ``--p`` per case).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BASE_PROMPT = "A |<C*1>| |<C*2>| |<C*3>| photo"
POS, NEG = "|<AP*1>| |<AP*2>| |<AP*3>|", "|<AN*1>| |<AN*2>| |<AN*3>|"


def import_authors(time_dir: str):
    sys.path.insert(0, time_dir)
    for name in ("pandas", "torchvision", "torchvision.datasets", "torchvision.transforms"):
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: type(attr, (), {})  # base classes of the datasets, never instantiated
        sys.modules.setdefault(name, stub)
        if "." in name:
            setattr(sys.modules[name.split(".")[0]], name.split(".")[1], sys.modules[name])
    import core.dataset
    import core.edict
    import core.utils

    return core.edict.EDICT, core.utils, core.dataset


def token_files(xcheck: Path, tmp: Path) -> list[str]:
    """The fixture's vectors as the code's embedding files (context, class 0 = AN, class 1 = AP)."""
    vec = load_file(str(xcheck / "tokens.safetensors"))
    meta = json.loads((xcheck / "tokens.json").read_text())
    ctx = meta["tokens"]["context"]
    neg, pos = (meta["tokens"]["classes"][label] for label in meta["labels"])
    files = []
    for words, names in ((BASE_PROMPT.split()[1:4], ctx), (NEG.split(), neg), (POS.split(), pos)):
        f = tmp / f"{len(files)}.pth"
        torch.save({"words": list(words), "embs": torch.stack([vec[n] for n in names])}, f)
        files.append(str(f))
    return files


def text_encoder(folder: Path):
    """The folder's CLIP text encoder; transformers 5 saves its weights without the ``text_model.`` prefix that
    4.26 expects, so the state dict is loaded by hand (I/O only; every weight must land)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder)).eval()
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
             for k, v in load_file(str(folder / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    lost = [k for k in missing if not k.endswith("position_ids")]
    if lost or unexpected:
        raise SystemExit(f"{folder}: text encoder weights do not fit (missing {lost}, unexpected {unexpected})")
    return model


def pipeline_for(EDICT, utils, folder: Path, files: list[str]):
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    pipe = EDICT(vae=AutoencoderKL.from_pretrained(folder / "vae"),
                 text_encoder=text_encoder(folder / "text_encoder"),
                 tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                 unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
                 scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    utils.load_tokens_and_embeddings(sd_model=pipe, files=files)  # as generate-ce.py from here on
    pipe.reverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_case(pipe, utils, dataset, case: dict, image: torch.Tensor, sources: torch.Tensor) -> dict:
    name = case["name"]
    args = types.SimpleNamespace(base_prompt=BASE_PROMPT, pos_custom_token=POS, neg_custom_token=NEG,
                                 dataset="CelebAHQ")
    img = image * 2 - 1  # the code's Normalize([0.5]*3, [0.5]*3)
    c_pred = sources.float()
    target = 1 - c_pred
    target_prompts, source_prompts = [], []
    for t, p in zip(target, c_pred, strict=True):
        n, t = utils.generate_prompt(args=args, target=t.item(), pred=p.item(), binary=True)
        target_prompts.append(t)
        source_prompts.append(n)
    out = {f"{name}_latent": pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor,
           f"{name}_embeds_source": pipe.encode_string(prompt=source_prompts),
           f"{name}_embeds_target": pipe.encode_string(prompt=target_prompts)}
    print(f"{name}: source prompts {source_prompts}, target prompts {target_prompts}")
    for k, (nis, gs) in enumerate(case["schedule"], start=1):
        xt, yt, _, _, feats = pipe.Invert(prompt=source_prompts, prompt_embeds=None, image=img,
                                          num_inference_steps=int(nis),
                                          total_num_inference_steps=case["total_steps"], guidance_scale=gs,
                                          p=case["p"], return_pil=False, negative_prompt=target_prompts, l2=0.0)
        cf = pipe.Denoise(prompt=target_prompts, prompt_embeds=None, xt=xt, yt=yt, num_inference_steps=int(nis),
                          total_num_inference_steps=case["total_steps"], guidance_scale=gs, p=case["p"],
                          return_pil=False, negative_prompt=source_prompts, l2=0.0, feats=feats)
        out[f"{name}_a{k}_inverted_x"], out[f"{name}_a{k}_inverted_y"] = xt, yt
        out[f"{name}_a{k}_counterfactual"] = dataset.celebahq_postprocessing(cf, image.shape[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", required=True, help="a checkout of guillaumejs2403/TIME")
    ap.add_argument("--folder-eps", required=True, type=Path)
    ap.add_argument("--folder-v", required=True, type=Path)
    ap.add_argument("--xcheck", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    EDICT, utils, dataset = import_authors(a.time)
    inputs = load_file(str(a.xcheck / "inputs.safetensors"))
    cases = json.loads((a.xcheck / "cases.json").read_text())
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(a.xcheck, Path(tmp))
        for case in cases:
            folder = a.folder_eps if case["prediction_type"] == "epsilon" else a.folder_v
            pipe = pipeline_for(EDICT, utils, folder, files)
            result.update(run_case(pipe, utils, dataset, case, inputs["image"], inputs["sources"]))
    save_file({k: v.float().contiguous() for k, v in result.items()}, str(a.out))
    print(f"wrote {len(result)} tensors to {a.out}")


if __name__ == "__main__":
    main()
