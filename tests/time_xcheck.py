"""The TIME cross-check fixture (``tests/fixtures/time-xcheck``): its inputs, the tiny SD folder it runs on, and
cfx's side of the comparison. ``scripts/crosscheck_time_reference.py`` produces the reference outputs with the
authors' code; ``tests/test_time_parity.py`` checks cfx against them.

The folder is the time-edict fixture's UNet/VAE/scheduler (``../shared/fixtures/time-edict``; the scheduler's
``prediction_type`` per case) plus this fixture's random CLIP text encoder and character-level tokenizer
(``tests/tiny_sd.py``), so the prompt → embedding path with the fitted tokens is part of the comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cfx_plugins.explainers.time import tokens as T

XCHECK = Path(__file__).parent / "fixtures" / "time-xcheck"
LABELS = ["serious", "smile"]  # the README's CelebA-HQ smile task: class 0 → |<AN*k>|, class 1 → |<AP*k>|
NUM_TOKENS = 3
CLASS_PROMPT = "A {context} photo with a {class}"  # the README's base prompt + core/utils.generate_prompt
#: max abs difference allowed per tensor family (README): fp32 on a CPU, different diffusers/transformers
TOLERANCE = {"latent": 1e-4, "embeds": 1e-5, "inverted": 1e-3, "counterfactual": 1e-3}
CASES = [
    # the README's schedule (STEPS="15 20 25 35", GS="4 4 4 4") on a 50-step chain, p = 0.93 (the code's default)
    {"name": "eps", "prediction_type": "epsilon", "total_steps": 50, "p": 0.93,
     "schedule": [[15, 4.0], [20, 4.0], [25, 4.0], [35, 4.0]]},
    # τ = T (the inverse scheduler's level above the last one: ᾱ = 0) and g = 1 (the code then skips the
    # negative prompt: do_classifier_free_guidance is False)
    {"name": "edge", "prediction_type": "epsilon", "total_steps": 10, "p": 0.9, "schedule": [[3, 2.5], [10, 1.0]]},
    # an SD 2.x (v-prediction) folder. The code hands v to the schedulers, which convert it to ε with the
    # stream being stepped (EDICT evaluates the UNet on the other one); cfx converts at the UNet's input
    # (docs/methods/time.md), so only the encoding and the prompts are expected to agree
    {"name": "v", "prediction_type": "v_prediction", "total_steps": 10, "p": 0.93, "schedule": [[4, 3.0]],
     "matches": ["latent", "embeds"]},
]


def make_inputs(edict_fixture: Path, out: Path = XCHECK) -> None:
    """Write the fixture's inputs: text encoder + tokenizer, the token artifact (fixed random vectors), two 16×16
    images (8-bit values) with their source classes, and cases.json. Deterministic."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.tiny_sd import build_tiny_sd

    tmp = out / "_build"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_sd(edict_fixture, tmp)
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(out / sub, ignore_errors=True)
        shutil.copytree(tmp / sub, out / sub)
    shutil.rmtree(tmp)
    table = load_file(str(out / "text_encoder" / "model.safetensors"))
    std = float(next(v for k, v in table.items() if "token_embedding" in k).std())
    g = torch.Generator().manual_seed(18)
    ctx = T.context_token_names(NUM_TOKENS)
    classes = {label: T.class_token_names(k, NUM_TOKENS) for k, label in enumerate(LABELS)}
    names = ctx + [n for v in classes.values() for n in v]
    vectors = {n: torch.randn(32, generator=g) * std for n in names}
    meta = {"tokens": {"context": ctx, "classes": classes}, "labels": LABELS,
            "classifier": {"spec": "time-xcheck"}, "base_model": "time-xcheck", "embedding_dim": 32,
            "fit_preset": "published", "prompts": {"context": "A {context} {picture}", "class": CLASS_PROMPT}}
    T.save_artifact(out / "tokens", vectors, meta)
    image = torch.round(torch.rand(2, 3, 16, 16, generator=g) * 255) / 255
    save_file({"image": image, "sources": torch.tensor([0, 1])}, str(out / "inputs.safetensors"))
    (out / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n")


def assemble_folder(edict_fixture: Path, out: Path, prediction_type: str, xcheck: Path = XCHECK) -> Path:
    """An SD folder of the time-edict UNet/VAE/scheduler and this fixture's text encoder and tokenizer."""
    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(edict_fixture / sub, out / sub)
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(xcheck / sub, out / sub)
    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": prediction_type}, indent=2))
    return out


def load_inputs(xcheck: Path = XCHECK) -> tuple[Any, Any, list[dict[str, Any]]]:
    from safetensors.torch import load_file

    t = load_file(str(xcheck / "inputs.safetensors"))
    return t["image"], t["sources"], json.loads((xcheck / "cases.json").read_text())


def cfx_generator(folder: Path, xcheck: Path = XCHECK):
    """cfx's TIME generator on ``folder`` with the fixture's tokens installed."""
    from cfx_cli.models import load_model
    from cfx_plugins.explainers.time.fit import install_artifact
    from cfx_plugins.explainers.time.generate import TimeGenerator

    model = load_model(f"diffusers:{folder}", expect="latent")
    vectors, meta = T.load_artifact(xcheck / "tokens")
    install_artifact(model, vectors, meta)
    return TimeGenerator(model, meta)


def expected_to_match(case: dict[str, Any], key: str) -> bool:
    """Whether the reference tensor ``key`` of ``case`` is one cfx must reproduce (see CASES)."""
    return any(part in key for part in case.get("matches", list(TOLERANCE)))


def tolerance(key: str) -> float:
    return next(v for k, v in TOLERANCE.items() if k in key)


def run_cfx_case(gen, case: dict[str, Any], image, sources, *, guidance: str = "w",
                 edict: str = "legacy") -> dict[str, Any]:
    """Every (τ, w) attempt of ``case`` on both images, keyed like the reference file."""
    from cfx_plugins.explainers.time.generate import guidance_scale

    name, steps, p = case["name"], case["total_steps"], case["p"]
    targets = 1 - sources
    out = {f"{name}_latent": gen.encode(image),
           f"{name}_embeds_source": gen.class_embeds(sources.tolist()),
           f"{name}_embeds_target": gen.class_embeds(targets.tolist())}
    for k, (tau, w) in enumerate(case["schedule"], start=1):
        g = guidance_scale(w, guidance)
        x, y = gen.invert(out[f"{name}_latent"], sources, targets, int(tau), g, steps, p, edict)
        out[f"{name}_a{k}_inverted_x"], out[f"{name}_a{k}_inverted_y"] = x, y
        out[f"{name}_a{k}_counterfactual"] = gen.counterfactuals(out[f"{name}_latent"], sources, targets, int(tau),
                                                                g, steps, p, edict, tuple(image.shape[-2:]))
    return out
