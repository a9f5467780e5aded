"""``eced``: from a visual explanation to a counterfactual with latent diffusion (ECED supplement, Alg. 1–3).

Alg. 1: ScoreCAM (or Grad-CAM) map of the predicted label, thresholded at ξ → pixel mask M, downsampled to the
latent mask M' (``cfx_cli.saliency``), or M from ``--region``. Alg. 2: Adam on the background latent z^bg and on a
copy of the VAE decoder's weights, minimising the background MSE (eq. 12). Alg. 3: T₂ attack iterations on
z_init: blended latent diffusion from z_init with the target prompt, decode with the tuned decoder, CE of the
target, gradient w.r.t. z_init through the chain and the decoder, pruned by M' (Proposition 1), Adam; an image
stops at its first flip. The authors published no code: every open choice is in docs/methods/eced.md.
"""

from __future__ import annotations

from typing import Any

from cfx_cli import saliency
from cfx_cli.backends.grad import GradCheck, describe, grad_model, grad_precision
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainBatch, ExplainContext, Explainer, ExplainOutput
from cfx_cli.guide import GUIDE_PARAMS
from cfx_cli.hookspecs import hookimpl
from cfx_cli.models import model_for
from cfx_cli.models.latent import RESOLUTION_PARAM
from cfx_cli.params import Param
from cfx_cli.saliency import probe_layer

DIGIT_NAMES = "zero,one,two,three,four,five,six,seven,eight,nine"


class ECED(Explainer):
    name = "eced"
    summary = "ECED: ScoreCAM key region → background-preserving blended latent diffusion attack (white-box)"
    requires = frozenset({"gradients"})
    uses_region = True
    # Alg. 2/3: decoder, UNet and classifier under --precision (autocast), the UNet through --channels-last / --compile
    gradient_options = frozenset({"precision", "channels_last", "compile"})
    params = (
        Param("xi", "float", 0.5, "ξ: threshold of the normalised CAM map; the key region is CAM > ξ "
              "(larger ξ, smaller region; vary it for diverse counterfactuals)", min=0.0, max=1.0),
        Param("cam", "str", "scorecam", "visual explanation of Alg. 1", choices=("scorecam", "gradcam")),
        Param("layer", "str", "", "classifier layer for the CAM (module name; '' = the saliency module's "
              "default, the last convolution)"),
        Param("latent_mode", "str", "nearest", "M' = downsample(M): nearest (Blended Latent Diffusion's rule), "
              "any (a latent cell touching the region), majority", choices=("nearest", "any", "majority")),
        Param("prompt", "str", "A photo of a/an {target}", "target prompt template; {target} is the class "
              "name, a/an becomes the fitting article"),
        Param("class_names", "str", "", "comma list of the words used for the classes in the prompt "
              "('' = the classifier's labels)"),
        Param("steps", "int", 50, "DDIM steps of the full chain over the model's training schedule", min=1),
        Param("tau", "int", 25, "τ: the chain starts at its τ-th level and runs τ blended steps", min=1),
        Param("guidance", "float", 7.5, "classifier-free guidance scale of the target prompt (1 = off)", min=0.0),
        Param("eta", "float", 1.0, "η of the DDIM step: 1 = the σ_t of the supplement's eq. 10, 0 = deterministic",
              min=0.0),
        Param("iterations", "int", 20, "T₂: attack iterations (Adam updates of z_init); 0 = the first blended "
              "generation only, no attack", min=0),
        Param("lr", "float", 0.05, "Adam learning rate of z_init", min=0.0),
        Param("noise", "str", "fresh", "fresh: new noise in every attack iteration (Alg. 3's z_τ ~ noise); "
              "fixed: the same draws every iteration (a deterministic objective)", choices=("fresh", "fixed")),
        Param("early_stop", "bool", True, "stop an image at its first flip (false: all T₂ iterations; the "
              "output is then the last image, flipped or not)"),
        Param("preserve_background", "bool", True, "run Alg. 2 (false: z^bg* = E(x) and the loaded decoder)"),
        Param("bg_iterations", "int", 100, "N: Alg. 2 iterations", min=0),
        Param("bg_lr_latent", "float", 0.01, "Alg. 2 Adam learning rate of z^bg", min=0.0),
        Param("bg_lr_decoder", "float", 1e-4, "Alg. 2 Adam learning rate of the decoder copy's weights", min=0.0),
        Param("keep_gray", "bool", True, "a grayscale input (all channels equal within one 8-bit level) gets a "
              "grayscale counterfactual: the decoder's output is projected onto the grey axis (channel mean), in "
              "Alg. 2's loss and in Alg. 3; colour inputs are untouched (docs/methods/eced.md)"),
        Param("checkpoint", "bool", False, "gradient checkpointing per denoising step (less memory, one more "
              "UNet pass per step in the backward)"),
        RESOLUTION_PARAM,
        *GUIDE_PARAMS,
    )
    presets = {
        # the supplement as written: Alg. 3 runs all T₂ iterations and returns I^(T₂) (no stop at the first flip),
        # eq. 10 denoises with C^CF alone (no classifier-free guidance); prompts of B.2
        "paper": {"early_stop": False, "guidance": 1.0},
        "paper-celebahq": {"prompt": "A photo of a/an {target} face", "early_stop": False, "guidance": 1.0},
        # supplement B.2: ImageNet prompts "A photo of a/an {category}."; CelebA-HQ "A photo of a/an {attr} face."
        "imagenet": {"prompt": "A photo of a/an {target}"},
        "celebahq": {"prompt": "A photo of a/an {target} face"},
        # the embedded demo: demo:latent was trained on "a handwritten digit three" (generators.caption);
        # chosen on the tuning digits (issue 22, docs/methods/eced.md): a key region large enough to redraw a digit
        # (ξ 0.07), the target prompt at CFG 7.5 and a deterministic chain (η 0), so the prior, not the attack,
        # makes the flip (158 of 178 tuning digits flip at the first generation); Alg. 2 at cfx's decoder rate 1e-4
        # (at 1e-3 the decoder copy decoded the key region 1.9–4.4× worse: bench/eced_decoder_drift.py)
        "digits": {"prompt": "a handwritten digit {target}", "class_names": DIGIT_NAMES, "xi": 0.07,
                   "steps": 50, "tau": 25, "guidance": 7.5, "eta": 0.0, "iterations": 20, "lr": 0.1},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
ECED (supplement of "From Visual Explanations to Counterfactual Explanations with Latent Diffusion"; no public
code). White-box. Alg. 1: ScoreCAM (--set cam=gradcam for Grad-CAM) of the predicted label at --set layer=NAME,
normalised to [0, 1], M = CAM > ξ (--set xi), latent mask M' = M downsampled to the latent grid; --region
FILE|DIR|SCHEME:ARG replaces M. Alg. 2 (--set preserve_background=false skips it): z^F = z^bg = E(x); N
iterations of z_init = z^F⊙M' + z^bg⊙(1−M'), z_0 = √α_0 z_init + √(1−α_0) ε, Adam on z^bg and a copy of the
decoder's weights against the background MSE (eq. 12); the loaded model is never modified. Alg. 3: prompt
(--set prompt="A photo of a/an {target}", class words from --set class_names); T₂ iterations: z_τ =
noise(z_init, τ), τ DDIM steps (eq. 10, η) with classifier-free guidance, each blended z_t = z^fg⊙M' +
noise(z^bg*, t)⊙(1−M'); image = D*(z_0); gradient of CE(f(image), y') w.r.t. z_init through the chain and the
decoder, pruned by M', Adam. An image stops at its first flip. A grayscale input (channels equal) gets a
grayscale counterfactual: the decoder output is projected onto the grey axis (--set keep_gray=false: off).
Model: --model diffusers:SD_FOLDER (SD 1.x/2.x layout; v-prediction is converted to ε) or demo:latent (default).
Presets: paper / paper-celebahq (the supplement
as written: all T₂ iterations, output I^(T₂), unguided eq. 10; its ImageNet / CelebA-HQ prompts), imagenet,
celebahq (the prompts with cfx's defaults: early stop, CFG 7.5), digits (the demo; automatic with demo:digits).
Details and every open choice: docs/methods/eced.md.
"""

    def __init__(self, context: ExplainContext) -> None:
        super().__init__(context)
        from .core import chain_levels, class_names

        p = self.params
        for key in ("steps", "tau", "bg_iterations"):
            if p[key] < (0 if key == "bg_iterations" else 1):
                raise UsageError(f"eced: --set {key}={p[key]}: must be at least {0 if key == 'bg_iterations' else 1}")
        if p["iterations"] < 0:
            raise UsageError(f"eced: --set iterations={p['iterations']}: must be at least 0")
        if not 0 <= p["xi"] < 1:
            raise UsageError(f"eced: --set xi={p['xi']}: must be in [0, 1)")
        self.names = class_names(context.classifier.labels, p["class_names"])
        from .core import fill_prompt

        fill_prompt(p["prompt"], self.names[0])  # a bad template is a usage error before any work
        if p["layer"]:  # a named CAM layer is checked before any work (exists, runs, gives feature maps)

            size = context.classifier.input_size or (64, 64)
            probe_layer(context.classifier, p["layer"], size)
        self.model = model_for(context, "latent", "eced")
        m = self.model
        if not 1 <= p["steps"] <= m.num_train_timesteps:
            raise UsageError(f"eced: --set steps={p['steps']}: must be in 1…{m.num_train_timesteps}")
        self.start_ab, self.levels = chain_levels(m.alphas_cumprod, m.final_alpha_cumprod, m.num_train_timesteps,
                                                  m.steps_offset, p["steps"], p["tau"])
        self.alpha0 = float(m.alphas_cumprod[0])
        self._embeds: dict[Any, Any] = {}

    # -- Alg. 1 ------------------------------------------------------------------------------------------------
    def key_region(self, images, sources):
        """M: (N, 1, H, W) binary CAM region of the predicted labels at the classifier's resolution."""
        import torch

        p = self.params
        clf = self.context.classifier  # the saliency module runs it through its own logits (preprocessing)
        layer = p["layer"] or saliency.default_layer(clf)
        cam_fn = saliency.score_cam if p["cam"] == "scorecam" else saliency.grad_cam
        maps = cam_fn(clf, layer, images, sources)
        mask = torch.as_tensor(saliency.key_region(maps, p["xi"])).float()
        return _as_n1hw(mask, len(images)).to(images.device), layer

    def latent_mask(self, pixel_mask, latent_hw):
        import torch

        lat = torch.as_tensor(saliency.latent_mask(pixel_mask, tuple(latent_hw), mode=self.params["latent_mode"]))
        lat = lat.float()
        return (_as_n1hw(lat, pixel_mask.shape[0]) > 0.5).float().to(pixel_mask.device)

    # -- prompts -----------------------------------------------------------------------------------------------
    def embeds(self, classes: list[int]):
        """C^CF of each class (the text encoder's last hidden states), and the empty prompt's for guidance."""
        import torch

        from .core import fill_prompt

        missing = sorted({k for k in classes if k not in self._embeds} | ({None} - set(self._embeds)),
                         key=lambda k: -1 if k is None else k)
        if missing:
            texts = ["" if k is None else fill_prompt(self.params["prompt"], self.names[k]) for k in missing]
            with torch.no_grad():
                out = self.model.encode_prompts(texts)
            self._embeds.update({k: out[i:i + 1] for i, k in enumerate(missing)})
        return torch.cat([self._embeds[k] for k in classes]), self._embeds[None]

    # -- the method --------------------------------------------------------------------------------------------
    def working_size(self) -> tuple[int, int]:
        return self.model.size  # the VAE's (or --set resolution=): cfx brings the inputs to it

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        import time

        import torch
        import torch.nn.functional as F

        from cfx_cli.images import resize_images
        from cfx_cli.optim import AdamRows

        from .core import (
            GrayDecoders,
            SharedDecoder,
            background_mse,
            blended_chain,
            draw_noise,
            gray_rows,
            preserve_background,
            prune,
            straight_through_unit,
        )

        p = self.params
        m = self.model
        clf = self.context.classifier
        dev = m.device
        n = len(batch.ids)
        size_b = tuple(batch.images.shape[-2:])
        r = (m.resolution, m.resolution)
        x = batch.images.detach().float()
        targets = batch.targets.to(dev)
        layer = None
        if batch.masks is not None:
            pix = (batch.masks > 0.5).float()
        else:
            pix, layer = self.key_region(x, batch.sources)
        x_r = resize_images(x, r).clamp(0, 1).to(dev)
        pix_r = (resize_images(pix, r, nearest=True) > 0.5).float().to(dev)
        with torch.no_grad():
            z_f = m.encode_images(x_r)
        lat = self.latent_mask(pix_r, z_f.shape[-2:])
        draws = self.context.noise.for_batch(batch.ids, batch.seeds, dev)
        # the VAE and Alg. 2's tuned decoder copy colour a grayscale digit (docs/methods/eced.md: keep_gray)
        gray = gray_rows(x).to(dev) if p["keep_gray"] else None

        cond_all, uncond = self.embeds([int(k) for k in targets.tolist()])
        chain = self.gradient_model(z_f, cond_all)  # m, or m with its UNet as --channels-last / --compile ask
        amp = self.precision(chain, z_f, cond_all, x)

        # Alg. 2 (each image has its own decoder copy)
        t0 = time.monotonic()
        if p["preserve_background"]:
            bgs = preserve_background(m.vae, m.scaling_factor, x_r, z_f, lat, pix_r, self.alpha0,
                                      p["bg_iterations"], p["bg_lr_latent"], p["bg_lr_decoder"], draws, gray=gray,
                                      amp=amp)
            z_bg, decoders = bgs.z_bg, bgs.decoders
        else:
            bgs = None
            z_bg, decoders = z_f.clone(), SharedDecoder(m.vae, m.scaling_factor)
        bg_seconds = time.monotonic() - t0
        if gray is not None:
            decoders = GrayDecoders(decoders, gray)

        # Alg. 3
        use_cfg = p["guidance"] != 1.0
        z_init = (z_f * lat + z_bg * (1 - lat)).detach()
        adam = AdamRows(z_init, p["lr"])
        unet_per_step = 2 if use_cfg else 1
        fixed = None
        if p["noise"] == "fixed":
            fixed = draw_noise(draws, list(range(n)), tuple(z_f.shape[1:]), len(self.levels))
        results: list[Any] = [None] * n
        generations = [0] * n
        active = list(range(n))
        for it in range(p["iterations"] + 1):
            rows = torch.tensor(active, device=dev)
            if fixed is None:
                noise = draw_noise(draws, active, tuple(z_f.shape[1:]), len(self.levels), iteration=it)
            else:
                noise = type(fixed)(fixed.start[rows], [s[rows] for s in fixed.step],
                                    [b[rows] for b in fixed.background])
            last = it == p["iterations"]
            with torch.enable_grad(), amp.autocast():
                zi = z_init[rows].clone().requires_grad_(not last)
                z0 = blended_chain(chain.unet_eps, zi, z_bg[rows], lat[rows], cond_all[rows],
                                   uncond.expand(len(active), -1, -1), p["guidance"], self.start_ab, self.levels,
                                   p["eta"], noise, checkpoint=p["checkpoint"])
                dec = decoders(z0, rows).float()
                img = resize_images(straight_through_unit(dec), size_b)
                logits = clf.logits(img).float() if not last else None
            with torch.no_grad():
                shown = img.detach().clamp(0, 1)
                pred = clf.logits(torch.round(shown * 255) / 255).argmax(1)
            flipped = (pred == targets[rows]).cpu()
            still = []
            for j, i in enumerate(active):
                generations[i] += 1
                results[i] = (shown[j].cpu(), it, bool(flipped[j]))
                if not (p["early_stop"] and flipped[j]):
                    still.append(j)
            if last or not still:
                break
            keep = torch.tensor(still, device=dev)
            loss = F.cross_entropy(logits[keep], targets[rows][keep], reduction="sum")
            (grad,) = amp.grad(loss, zi)
            with torch.no_grad():
                adam.step(z_init, prune(grad[keep], lat[rows][keep]), rows[keep])
            active = [active[j] for j in still]

        cf_all = torch.stack([res[0] for res in results])
        bg_after = background_mse(resize_images(cf_all, r).to(dev), x_r, pix_r).cpu()
        outputs = []
        n_chain = len(self.levels) * unet_per_step
        for i in range(n):
            img, it, flipped = results[i]
            nfe = 1 + (p["bg_iterations"] if p["preserve_background"] else 0) + generations[i] * (n_chain + 2)
            info = {
                "iterations_used": it, "flipped_at_iteration": it if flipped else None, "tau": p["tau"],
                "steps": p["steps"], "guidance": p["guidance"], "eta": p["eta"], "lr": p["lr"],
                "xi": p["xi"] if batch.masks is None else None,
                "region": "--region" if batch.masks is not None else f"{p['cam']}:{layer}",
                "region_area": round(float(pix[i].mean()), 4), "latent_area": round(float(lat[i].mean()), 4),
                "prompt": self._prompt(int(batch.targets[i])), "preserve_background": p["preserve_background"],
                "bg_mse": round(float(bg_after[i]), 6), "model": m.spec,
                "gray_projected": bool(gray[i]) if gray is not None else False,
                "gradients": describe(amp, chain.unet),
            }
            if bgs is not None:
                info.update({"bg_loss_first": round(bgs.loss_first[i], 6), "bg_loss_last": round(bgs.loss_last[i], 6),
                             "bg_seconds_batch": round(bg_seconds, 3)})
            outputs.append(ExplainOutput(counterfactual=img, mask=pix[i].cpu(), params=info, nfe=nfe))
        return outputs

    def gradient_model(self, z, cond):
        """The latent model Alg. 3 differentiates through: its UNet as ``--channels-last`` / ``--compile`` ask
        (:func:`cfx_cli.backends.grad.grad_model`, gated against the loaded one), else the loaded model."""
        import torch

        m = self.model
        example = (z[:1], torch.zeros((1,), device=z.device), cond[:1])
        return grad_model(self.context, m, "unet", _unet_output, example, f"{m.spec} unet")

    def precision(self, m, z, cond, images):
        """What Alg. 2/3's differentiated calls run in: ``--precision`` under autocast once the UNet (of ``m``), the
        decoder and the classifier pass the gate (:mod:`cfx_cli.backends.grad`), else fp32."""
        from .core import SharedDecoder

        clf = self.context.classifier
        t = self.levels[0].t
        decode = SharedDecoder(m.vae, m.scaling_factor)
        checks = [GradCheck(f"{m.spec} unet", lambda zz: m.unet_eps(zz, t, cond[:1].expand(len(zz), -1, -1)),
                            (z[:1],)),
                  GradCheck(f"{m.spec} vae decoder", decode, (z[:1],)),
                  GradCheck(clf.spec or "the classifier", clf.logits, (images[:1],))]
        return grad_precision(self.context, checks, key=("eced", id(m.unet), id(m.vae), id(clf),
                                                          tuple(z.shape[1:]), tuple(images.shape[1:])))

    def _prompt(self, k: int) -> str:
        from .core import fill_prompt

        return fill_prompt(self.params["prompt"], self.names[k])


def _unet_output(unet, z, t, text):
    return unet(z.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype)).sample


def _as_n1hw(t, n: int):
    """(N, H, W) or (N, 1, H, W) or (H, W) for N = 1 → (N, 1, H, W)."""
    if t.ndim == 2:
        t = t[None]
    if t.ndim == 3:
        t = t[:, None]
    if t.shape[0] != n or t.ndim != 4:
        raise ValueError(f"eced: unexpected mask shape {tuple(t.shape)} for {n} images")
    return t


@hookimpl
def register_explainers(register):
    register(ECED)
