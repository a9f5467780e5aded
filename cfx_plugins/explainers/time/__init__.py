"""``time``: TIME, black-box counterfactuals with textual inversion and EDICT (thesis ch. 5).

Fit once (``cfx fit time``): the classifier's predictions on a folder of training images are distilled into
text tokens of a latent text-to-image model. Explain: invert the image with EDICT under the source-class
prompt (the target-class prompt as negative guidance, eq. 5.11), denoise under the target-class prompt (the
source as negative), decode and ask the classifier; images that did not flip are retried with the next
(τ, w) of the schedule. Needs only the classifier's probabilities.
"""

from __future__ import annotations

from typing import Any

from cfx_cli.demo import DEMO_DIR
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainBatch, ExplainContext, Explainer, ExplainOutput
from cfx_cli.hookspecs import hookimpl
from cfx_cli.models import model_for
from cfx_cli.models.catalog import DEFAULT_MODELS
from cfx_cli.models.latent import RESOLUTION_PARAM
from cfx_cli.params import Param, resolve_params

from . import tokens as T
from .cli import fit_time
from .fit import FIT_AUTO_PRESETS, FIT_PARAMS, FIT_PRESETS, fit_time_tokens, install_artifact
from .schedule import GUIDANCE_CONVENTIONS, guidance_scale, parse_schedule

# (τ, w) of thesis §5.4; w is the authors' code's guidance scale g (--guidance-scale-*), see generate.py
SMILE = "25:3,30:4,35:4,35:6"
AGE = "30:4,30:6,35:4,35:6"
# the demo digits, chosen on the tuning split (issue 22, docs/methods/time.md): no attempt milder than (12, 4), whose
# flips the independent judges still read as the target (DEMO-FEASIBILITY's first attempt (10, 3) flipped the CNN
# with edits they mostly did not), then (20, 3) and (25, 4) for the rest
DIGITS = "12:4,20:3,25:4"
# the published runs: the authors' code (legacy EDICT pairing, g = w) with the thesis schedules
PUBLISHED = {"edict": "legacy", "guidance": "w"}


class Time(Explainer):
    name = "time"
    summary = "TIME: textual inversion + EDICT, black-box (thesis ch. 5); --tokens or --fit-data (demo: shipped)"
    requires = frozenset()
    uses_backend = True  # the UNet/VAE forward-only calls (cfx_cli.backends.latent)
    params = (
        Param("tokens", "str", "", "token file written by `cfx fit time` (alias: --tokens FILE)"),
        Param("fit_data", "str", "", "fit the tokens now on this folder of training images (alias: --fit-data DIR)"),
        Param("schedule", "str", SMILE, "(τ, w) attempts as TAU:W,...; an image stops at its first flip"),
        Param("steps", "int", 50, "DDIM steps T of the full chain (τ of them are inverted)", min=1),
        Param("p", "float", 0.93, "EDICT mixing coefficient", min=0.0, max=1.0),
        Param("edict", "str", "exact", "exact: invertible level pairing; legacy: the published code's",
              choices=("exact", "legacy")),
        Param("guidance", "str", "w", "what a schedule's W means: w (the guidance scale g = w, as the authors' "
              "code) or 1+w (g = 1 + w, cfx's old default)", choices=GUIDANCE_CONVENTIONS),
        Param("fit_preset", "str", "", "with --fit-data: the `cfx fit time` preset (default: auto/thesis)",
              choices=("", *FIT_PRESETS)),
        Param("fit_iterations", "int", 0, "with --fit-data: iterations per token set (0 = the preset's)", min=0),
        RESOLUTION_PARAM,
    )
    presets = {
        "smile": {"schedule": SMILE},
        "age": {"schedule": AGE},
        "digits": {"schedule": DIGITS},
        "published": {"schedule": SMILE, **PUBLISHED},
        "published-age": {"schedule": AGE, **PUBLISHED},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Thesis chapter 5 (Jeanneret 2024). Tokens: 3 context tokens learned on all training images ("a <ctx>
picture"), 3 tokens per class learned on the images the classifier predicts as that class ("a <ctx> picture
with a <class>"); `cfx fit time --data DIR --classifier SPEC --out FILE` writes them (FILE.safetensors +
FILE.json), `--tokens FILE` uses them, `--fit-data DIR` fits on the fly. Generation: VAE posterior mean
× scaling; EDICT (p = 0.93) inversion over the first τ of T = 50 DDIM steps with ε = ε(neg) + g(ε(pos) −
ε(neg)), g = w as in the authors' code (guidance=1+w: g = 1 + w, cfx's old default), positive = source
prompt, negative = target prompt; denoising with the roles swapped; decode (the classifier applies its own
resize). Images that do not flip go on to the next (τ, w) of the schedule (smile: (25,3)(30,4)(35,4)(35,6); age:
(30,4)(30,6)(35,4)(35,6)); params record the attempt used. Exact EDICT by default; edict=legacy reproduces
the published code's level pairing (not exactly invertible); preset=published (published-age) = legacy +
g = w + the smile (age) schedule, with tokens from `cfx fit time --set preset=published`.
Model: --model diffusers:SD_FOLDER_OR_ID (SD 1.x/2.x; v-prediction is converted to ε) or demo:latent (the
default; the embedded demo).
"""

    def __init__(self, context: ExplainContext) -> None:
        super().__init__(context)
        parse_schedule(self.params["schedule"])  # a bad schedule is a usage error before any work
        # model, tokens and their checks (or the on-the-fly fit) before the first image
        self._gen, self._tokens_info = build_generator(context)
        # forward-only UNet/VAE calls on --backend (after any token fitting, whose gradients stay in torch)
        self._backend = self._gen.model.use_backend(context)

    def _generator(self):
        return self._gen

    @classmethod
    def auto_preset(cls, classifier_spec: str, model: str | None, settings: dict[str, Any]) -> tuple[str, str] | None:
        """The explain preset that goes with the fit preset of the tokens (`cfx fit time` picks `digits` for the
        demo model, whichever classifier — e.g. the same model served over http — is used later)."""
        tokens, fit_data = settings.get("tokens"), settings.get("fit_data")
        fitted = T.fit_preset_of(tokens) if tokens else None
        if fit_data and not tokens:
            fitted = FIT_AUTO_PRESETS.get(model or DEFAULT_MODELS["latent"])
        if fitted in cls.presets:
            how = f"the tokens {tokens} were" if tokens else "--fit-data is"
            return fitted, f"(the fit preset {how} fitted with)"
        return super().auto_preset(classifier_spec, model, settings)

    def run_info(self) -> dict[str, Any]:
        return {"tokens": self._tokens_info}

    def working_size(self) -> tuple[int, int]:
        return self._gen.model.size  # the VAE's (or --set resolution=): cfx brings the inputs to it

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        import torch

        p = self.params
        schedule = parse_schedule(p["schedule"])
        gen = self._generator()
        clf = self.context.classifier
        n = len(batch.ids)
        size = tuple(batch.images.shape[-2:])
        latents = gen.encode(batch.images)
        outputs: list[Any] = [None] * n
        nfe = [gen_nfe_encode() for _ in range(n)]
        active = list(range(n))
        for attempt, (tau, w) in enumerate(schedule, start=1):
            if not active:
                break
            sel = torch.tensor(active)
            src, tgt = batch.sources.cpu()[sel], batch.targets.cpu()[sel]
            imgs = gen.counterfactuals(latents[sel], src, tgt, tau, guidance_scale(w, p["guidance"]),
                                       p["steps"], p["p"], p["edict"], size)
            probs = clf.predict_proba(torch.round(imgs * 255) / 255)  # as the saved PNG will be
            flipped = probs.argmax(1) == batch.targets.cpu()[sel]
            still = []
            for j, i in enumerate(active):
                # 2 ε per EDICT step × 2 prompts × (τ up + τ down); decode; classify
                nfe[i] += 8 * tau + 1 + 1
                outputs[i] = ExplainOutput(
                    counterfactual=imgs[j],
                    params={"attempt": attempt, "tau": tau, "w": w, "g": guidance_scale(w, p["guidance"]),
                            "steps": p["steps"], "p": p["p"], "edict": p["edict"],
                            "flipped_at_attempt": bool(flipped[j]), "backend": self._backend},
                )
                if not bool(flipped[j]):
                    still.append(i)
            active = still
        for i, out in enumerate(outputs):
            out.nfe = nfe[i]
        return outputs


def gen_nfe_encode() -> int:
    return 1  # the VAE encoder pass


def build_generator(context: ExplainContext):
    """Load the model, then the tokens (--tokens FILE) or fit them on the fly (--fit-data DIR). → (generator,
    what run.json records about the tokens: their files and hashes, or the on-the-fly fit)."""
    import sys

    tokens_file, fit_data = context.params.get("tokens") or None, context.params.get("fit_data") or None
    clf = context.classifier
    if not tokens_file and not fit_data and clf.spec == "demo:digits" and context.model in (None, "demo:latent"):
        shipped = DEMO_DIR / "models" / "latent" / "time-tokens-digits"
        if shipped.with_suffix(".safetensors").exists():
            # the embedded demo ships tokens fitted by `cfx fit time` on its training digits
            tokens_file = str(shipped)
            print(f"note: using the demo's fitted TIME tokens {shipped.name} (demo:digits on demo:latent)",
                  file=sys.stderr)
    if not tokens_file and not fit_data:
        raise UsageError("method time needs --tokens FILE (written by `cfx fit time`) or --fit-data DIR "
                         "(fit the tokens now on a folder of training images)")
    if tokens_file and fit_data:
        raise UsageError("give either --tokens or --fit-data, not both")
    if tokens_file:
        vectors, meta = T.load_artifact(tokens_file)
        info = T.artifact_record(tokens_file, meta)
        model = _latent_model(context, context.model or meta.get("base_model"))
        for note in T.check_artifact(meta, str(tokens_file), clf.labels, clf.spec, model.spec,
                                     model.embedding_dim):
            print(f"note: {note}", file=sys.stderr)
    else:
        model = _latent_model(context, context.model)
        preset = context.params.get("fit_preset") or FIT_AUTO_PRESETS.get(model.spec, "thesis")
        overrides = {"preset": preset}
        if context.params.get("fit_iterations"):
            overrides["iterations"] = context.params["fit_iterations"]
        fit_params = resolve_params("fit time", FIT_PARAMS, FIT_PRESETS, overrides)
        print(f"note: fitting TIME tokens on {fit_data} (preset {preset!r}); `cfx fit time` saves them for "
              "reuse", file=sys.stderr)
        result = fit_time_tokens(fit_data, clf, model, fit_params)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        vectors, meta = result.vectors, result.meta
        info = {"fitted_on": str(fit_data), "fit_preset": preset}
    from .generate import TimeGenerator  # torch, through the diffusion math

    install_artifact(model, vectors, meta)
    return TimeGenerator(model, meta), info


def _latent_model(context: ExplainContext, spec: str | None):
    # a private copy: TIME installs its tokens into the text encoder and routes calls to its --backend
    return model_for(context, "latent", "time", spec=spec, fresh=True)


@hookimpl
def register_explainers(register):
    register(Time)


@hookimpl
def register_commands(fit):
    fit.command("time")(fit_time)
