"""``ace``: Adversarial Counterfactual Explanations (Jeanneret et al., CVPR 2023; thesis ch. 4 + appendix A).

1. Pre-explanation: an adversarial attack (PGD; GD and C&W as alternatives) on
   w_c·L_class(C(F_τ(x')), y') + λ_d·d(x', x), where F_τ noises x' to index τ−1 of a respaced schedule and runs the
   stochastic DDPM chain back to 0; gradients flow through the whole chain (optionally checkpointed per step).
2. Mask: Σ_channels |x − x'|, normalised by its maximum, dilated (15×15 max filter), thresholded.
3. Refinement (RePaint-style): noise x' to τ−1, denoise while pasting q_sample(x, t) outside the mask.
Each stage is a method the explainer itself calls (``class_gradient``, ``distance_gradient``, ``attack_update``,
``masks``, ``refine``); ``trace`` optionally records the intermediates. The defaults compute what the authors'
code computes (tests/test_ace_e2e.py); choices and their sources: docs/methods/ace.md.
"""

from __future__ import annotations

from typing import Any

from cfx_cli.backends.grad import FP32, GradCheck, describe, grad_model, grad_precision
from cfx_cli.backends.pixel import network_output, pixel_forward
from cfx_cli.classifiers import target_score
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.guide import GUIDE_PARAMS
from cfx_cli.hookspecs import hookimpl
from cfx_cli.models import pixel_prior
from cfx_cli.params import Param

_CW_C = 1e-5  # the authors' constant keeping tanh away from ±1 (C&W parametrisation)


def nfe_per_image(iterations: int, tau: int) -> tuple[int, int]:
    """(diffusion-network, classifier) evaluations per image: τ per attack iteration plus τ for the refinement;
    one classifier gradient per iteration."""
    return iterations * tau + tau, iterations


def truncated_tau(time_fraction: float, steps: int) -> int:
    """τ as the authors' ``main.py`` computes it: ``int(sampling_time_fraction · respaced steps)``, truncated
    (so a fraction whose product falls just below an integer loses a step, exactly as in their runs)."""
    return int(time_fraction * steps)


class ACE(Explainer):
    name = "ace"
    summary = "ACE: adversarial attack through a diffusion filter, then RePaint refinement (thesis ch. 4)"
    requires = frozenset({"gradients"})
    uses_region = True
    uses_backend = True  # the diffusion UNet's forward-only calls (cfx_cli.backends.pixel)
    # the differentiated filter F_τ and the classifier under --precision (autocast), the filter's UNet through
    # --channels-last / --compile
    gradient_options = frozenset({"precision", "channels_last", "compile"})
    params = (
        Param("attack", "str", "pgd", "optimiser of the pre-explanation: 'pgd' (sign steps), 'gd' (plain "
              "gradient steps), 'cw' (Carlini–Wagner tanh parametrisation and margin loss)",
              choices=("pgd", "gd", "cw")),
        Param("iterations", "int", 50, "attack iterations (thesis: 50; ImageNet 100)", min=1),
        Param("step", "float", 1 / 255, "attack step size (accepts fractions like 1/255)", min=0.0),
        Param("epsilon", "float", 1.0, "ℓ∞ bound around the input for pgd/gd (1 = unbounded, as published)",
              min=0.0, max=1.0),
        Param("time_fraction", "float", 0.1, "the authors' sampling_time_fraction: τ = int(time_fraction · "
              "respaced steps), truncated as in their main.py (0.1 of 50 steps: τ = 5)", min=0.0, max=1.0),
        Param("tau", "int", 0, "τ: steps of the respaced schedule the filter F_τ noises and denoises "
              "(0 = from time_fraction)", min=0),
        Param("respacing", "str", "50", "steps kept from the model's training schedule (guided-diffusion "
              "timestep_respacing; '' = as loaded)"),
        Param("distance", "str", "l1", "d(x', x): 'l1' (Σ|x − x'|) or 'l2' (‖x − x'‖₂)", choices=("l1", "l2")),
        Param("lambda_d", "float", 0.001, "λ_d: distance weight (thesis: 0.001 for ℓ1, 0.1 for ℓ2)", min=0.0),
        Param("class_weight", "float", 1.0, "w_c: weight of each image's class loss (summed over the batch, so "
              "results do not depend on the batch); the paper presets set 1/(batch size of the authors' script), "
              "the weight their batch-mean cross-entropy gives each image", min=0.0),
        Param("threshold", "float", 0.15, "binarisation threshold of the dilated, max-normalised difference "
              "(0 = change everywhere: no refinement mask)", min=0.0, max=1.0),
        Param("dilation", "int", 15, "side of the square max filter dilating the difference (odd)", min=1),
        Param("stochastic", "bool", True, "sample noise in the filter and the refinement (False: means only)"),
        Param("checkpoint", "bool", False, "gradient checkpointing over the filter's DDPM steps (recomputes "
              "each step in the backward pass: less memory, ~1 more forward per step)"),
        Param("cw_final_update", "bool", False, "C&W only: return x' after the last update (cfx's earlier "
              "behaviour) instead of the iterate the last gradient was taken at (the authors' CW.attack)"),
        *GUIDE_PARAMS,
    )
    presets = {
        # appendix A + the authors' scripts/*-attack.sh (PGD, 50 iterations, ℓ1 λ_d 0.001); class_weight =
        # 1/SAMPLE_FLAGS --batch_size of that script (celeba-attack.sh runs batch 3, the others batch 1)
        "celeba": {"respacing": "50", "time_fraction": 0.1, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                   "threshold": 0.15, "class_weight": 1 / 3},
        "celebahq": {"respacing": "25", "time_fraction": 0.2, "iterations": 50, "distance": "l1",
                     "lambda_d": 0.001, "threshold": 0.15, "class_weight": 1.0},
        "bdd": {"respacing": "100", "time_fraction": 0.05, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                "threshold": 0.05, "class_weight": 1.0},
        "imagenet": {"respacing": "25", "time_fraction": 0.2, "iterations": 100, "distance": "l1",
                     "lambda_d": 0.001, "threshold": 0.15, "class_weight": 1.0},
        # the embedded 16×16 demo (1000-step pixel DDPM), tuned on the demo's tuning digits (issue 22; table in
        # docs/methods/ace.md): a deeper filter (τ = 10 of 50, t ≈ 190) with a 4/255 step and a weak ℓ1 term makes
        # the attack's edits digit strokes rather than adversarial patterns; DVCE guidance by the robust demo CNN
        # (cfx_cli/guide.py) steers them further
        "digits": {"respacing": "50", "time_fraction": 0.2, "iterations": 25, "step": 4 / 255, "distance": "l1",
                   "lambda_d": 0.0001, "threshold": 0.15, "dilation": 3, "guide": "demo:digits-robust",
                   "guide_cone": 45.0},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Jeanneret, Simon & Jurie, "Adversarial Counterfactual Visual Explanations" (CVPR 2023; thesis ch. 4, app. A).
Pre-explanation x' (starting at x): `iterations` steps of the chosen attack on
w_c·CE(C(F_τ(x')), y') + λ_d·d(x', x), where F_τ(x') = q_sample(x', τ−1) followed by the stochastic DDPM chain
τ−1 … 0 on the respaced schedule (x̂₀ clipped, no noise after the last step), differentiated through every step
(checkpoint=true recomputes each step in the backward pass); the classifier sees (z+1)/2 unclamped.
τ = int(time_fraction · respaced steps) unless tau is set. PGD: x' ← clip(x' − step·sign(∇), 0, 1) with
sign(0) = 0, no ε-ball unless epsilon < 1. Cross-entropy is summed over the batch (w_c = class_weight per image);
the authors average it, so the presets set w_c = 1/(their script's batch size).
Mask: m = Σ_c|x − x'| / max, dilated with a `dilation`² max filter, changed where ≥ threshold.
Refinement: x' noised to τ−1, then for t = τ−1 … 0: x'_t ← m⊙x'_t + (1−m)⊙q_sample(x, t), one DDPM step.
Output m⊙x'_0 + (1−m)⊙x: identical to the input outside the mask. With --mask M the refinement mask is m⊙M and
the attack only moves pixels inside M. Saved: masks/ (m) and pre_explanations/ (x').

Prior: --model adm:PATH.pt --model-flags "…", diffusers:FOLDER, or demo:pixel (default). Presets follow
appendix A and the authors' scripts (celeba 0.1 of 50 steps with class_weight 1/3, celebahq 0.2 of 25, bdd 0.05
of 100 with threshold 0.05, imagenet 0.2 of 25 with 100 iterations: τ = 5 each); for ℓ2 set distance=l2
lambda_d=0.1 (CelebA-HQ thresholds: smile 0.1, age 0.05; BDD 0.1). digits (the demo's auto preset, tuned on its
tuning digits): τ = 10 of 50, 25 steps of 4/255, λ_d 0.0001, guide=demo:digits-robust with guide_cone=45.
NFE per image: iterations·τ + τ prior evaluations + iterations classifier gradients. Details:
docs/methods/ace.md.
"""

    def __init__(self, context) -> None:
        super().__init__(context)
        p = self.params
        if p["dilation"] < 1 or p["dilation"] % 2 == 0:
            raise UsageError(f"ace: --set dilation={p['dilation']}: must be an odd number ≥ 1")
        self.model, self.model_spec = pixel_prior(context, p["respacing"], "ace")
        steps = self.model.diffusion.num_steps
        self.tau = p["tau"] or truncated_tau(p["time_fraction"], steps)
        if self.tau < 1:
            raise UsageError(f"ace: τ = int(time_fraction · {steps} steps) = int({p['time_fraction']} · {steps}) "
                             "= 0: raise --set time_fraction or give --set tau")
        if self.tau > steps:
            raise UsageError(f"ace: --set tau={self.tau} exceeds the {steps} steps of the respaced schedule "
                             f"(respacing={p['respacing']!r})")
        #: set to a dict before ``explain`` to record the intermediates of the next batch (tests, debugging):
        #: pgd_iterates, pgd_class_grads, pre_explanation, mask, dilated_mask, inpaint_mask (1 = taken from x),
        #: noisy_pre_explanation and counterfactual (float, at the prior's size, before any resize or 8-bit save)
        self.trace: dict[str, Any] | None = None
        self.amp = FP32  # what the differentiated filter runs in (set per batch by explain, from --precision)
        self.filter_model = self.model  # F_τ's network (per batch: --channels-last / --compile, gated)

    # -- the diffusion filter F_τ --------------------------------------------------------------------------
    def _draw(self, noise, rows, shape, keys):
        """(N, len(keys), C, H, W): the draws ``keys`` (name, index) of each image, taken together (zeros when
        not stochastic)."""
        import torch

        if not self.params["stochastic"]:
            return torch.zeros((len(rows), len(keys), *shape), device=noise.device)
        return noise.randn_block(rows, shape, keys)

    def filter_keys(self, iteration: int):
        """The draws of one pass of F_τ: the q_sample draw, then one per DDPM step."""
        steps = range(self.tau - 1, -1, -1)
        return [("filter_q_sample", (iteration,))] + [("filter_step", (iteration, i)) for i in steps]

    def _step(self, z, i: int, eps):
        z, _ = self.model.diffusion.ddpm_step(self.filter_model(z, i), z, i, noise=eps, clip_denoised=True)
        return z

    def filter(self, x01, draws):
        """F_τ(x') for x' in [0, 1], returned as (z + 1)/2 unclamped; differentiable w.r.t. x' through every step
        (the authors' JointClassifierDDPM)."""
        from torch.utils.checkpoint import checkpoint

        z = self.model.diffusion.q_sample(x01 * 2 - 1, self.tau - 1, draws[:, 0])
        for k, i in enumerate(range(self.tau - 1, -1, -1), start=1):
            if self.params["checkpoint"] and z.requires_grad:
                z = checkpoint(self._step, z, i, draws[:, k], use_reentrant=False)
            else:
                z = self._step(z, i, draws[:, k])
        return (z + 1) / 2

    # -- step 1: pre-explanation -------------------------------------------------------------------------
    def class_loss(self, logits, targets):
        """w_c · Σ_images L_class: cross-entropy (−log p(y'), for K = 2 a function of the logit difference only)
        or, for cw, the margin max_{j≠y'} z_j − z_{y'} floored at 0. Summed, so each image's gradient is its own."""
        import torch.nn.functional as F

        t = targets.to(logits.device)
        if self.params["attack"] == "cw":
            target_logit = logits.gather(1, t[:, None])[:, 0]
            others = logits.masked_fill(F.one_hot(t, logits.shape[1]).bool(), float("-inf")).amax(1)
            loss = F.relu(others - target_logit).sum()
        else:
            loss = -target_score(logits, t, "log_softmax").sum()
        return self.params["class_weight"] * loss

    def class_gradient(self, x_adv, targets, draws):
        """∇_{x'} of the class loss through F_τ and the classifier (the authors' ``extract_grads``)."""
        import torch

        with torch.enable_grad():
            x_in = x_adv.detach().requires_grad_(True)
            with self.amp.autocast():
                logits = self.context.classifier.logits(self.filter(x_in, draws)).float()
            (grad,) = self.amp.grad(self.class_loss(logits, targets), x_in)
        return grad

    def gradient_model(self, x01):
        """The prior F_τ differentiates: its network as ``--channels-last`` / ``--compile`` ask
        (:func:`cfx_cli.backends.grad.grad_model`, gated against the loaded one), else the loaded prior."""
        import torch

        m = self.model
        example = (torch.zeros((1, *x01.shape[1:]), device=x01.device, dtype=getattr(m, "dtype", None)),
                   torch.zeros((1,), device=x01.device))
        return grad_model(self.context, m, "net", network_output, example, f"{self.model_spec} (filter)")

    def precision(self, x01):
        """What the differentiated filter and the classifier run in: ``--precision`` under autocast once the UNet
        (one step of F_τ) and the classifier pass the gate (:mod:`cfx_cli.backends.grad`), else fp32."""
        clf = self.context.classifier
        one = x01[:1]
        checks = [GradCheck(f"{self.model_spec} (filter step)", lambda z: self.filter_model(z, self.tau - 1),
                            (one * 2 - 1,)),
                  GradCheck(clf.spec or "the classifier", clf.logits, (one,))]
        return grad_precision(self.context, checks, key=("ace", id(self.model.net), id(clf), tuple(x01.shape[1:])))

    def distance_gradient(self, x_adv, x):
        """∇_{x'} λ_d·d(x', x): ℓ1 gives λ_d·sign(x' − x) (0 where x' = x), ℓ2 the per-image unit direction (0 at
        x' = x, torch.linalg.norm's gradient there), as the authors' ``extract_dist_grads``."""
        import torch

        p = self.params
        if not p["lambda_d"]:
            return torch.zeros_like(x_adv)
        with torch.enable_grad():
            x_in = x_adv.detach().requires_grad_(True)
            diff = (x - x_in).reshape(len(x), -1)
            dist = diff.abs().sum() if p["distance"] == "l1" else torch.linalg.norm(diff, dim=1).sum()
            (grad,) = torch.autograd.grad(p["lambda_d"] * dist, x_in)
        return grad

    def attack_update(self, x_adv, x, grad, move=None):
        """One pgd/gd step from the total gradient: x' − step·sign(g) (pgd; sign(0) = 0) or x' − step·g (gd),
        then the ℓ∞ projection around x and the clamp to [0, 1]; ``move`` (1 = may change) confines it."""
        import torch

        p = self.params
        update = grad.sign() if p["attack"] == "pgd" else grad
        if move is not None:
            update = update * move
        x_adv = x_adv - p["step"] * update
        return torch.max(torch.min(x_adv, x + p["epsilon"]), x - p["epsilon"]).clamp(0, 1)

    def pre_explanation(self, x, targets, region, noise, rows):
        """x' after ``iterations`` attack steps, each with fresh filter noise (keys ``filter_keys(iteration)``)."""
        import torch

        p = self.params
        shape = tuple(x.shape[1:])
        trace = self.trace
        x_adv = x.clone()
        if p["attack"] == "cw":
            w = torch.atanh(2 * x / (1 + _CW_C) - 1)
        for it in range(p["iterations"]):
            if p["attack"] == "cw":
                x_adv = (torch.tanh(w) + 1) * (_CW_C + 0.5)
            draws = self._draw(noise, rows, shape, self.filter_keys(it))
            class_grad = self.class_gradient(x_adv, targets, draws)
            if trace is not None:
                trace.setdefault("pgd_iterates", []).append(x_adv.detach().clone())
                trace.setdefault("pgd_class_grads", []).append(class_grad)
            grad = class_grad + self.distance_gradient(x_adv, x)
            with torch.no_grad():
                if p["attack"] != "cw":
                    x_adv = self.attack_update(x_adv, x, grad, region)
                    continue
                # the chain rule through x' = (tanh w + 1)(½ + c), as the authors' CW.attack does by hand
                step = p["step"] * grad * (_CW_C + 0.5) * (1 - torch.tanh(w).pow(2))
                w = (w - (step if region is None else step * region)).clamp(-3, 3)
        if p["attack"] == "cw" and p["cw_final_update"]:
            x_adv = (torch.tanh(w) + 1) * (_CW_C + 0.5)
        pe = x_adv.clamp(0, 1).detach()
        if trace is not None:
            trace.setdefault("pgd_iterates", []).append(pe)
            trace["pre_explanation"] = pe
        return pe

    # -- steps 2–3: mask and refinement --------------------------------------------------------------------
    def masks(self, x, pe, region=None):
        """(m, dilated m, change): m = Σ_c|x − x'| / per-image max (the authors' ``generate_mask``), its
        ``dilation``² max filter, and the binary mask of what the refinement may change (dilated ≥ threshold;
        the authors' inpaint mask is 1 − change), intersected with ``region``."""
        diff = (x - pe).abs().sum(1, keepdim=True)
        peak = diff.reshape(len(x), -1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)  # x' = x: all 0, not NaN
        mask = diff / peak
        dilated = dilate(mask, self.params["dilation"])
        change = (dilated >= self.params["threshold"]).float()
        return mask, dilated, (change * region if region is not None else change)

    def refine(self, x, pe, change, noise, rows):
        """RePaint-style (the authors' ``filter_fn``): z = q_sample(x', τ−1); for t = τ−1 … 0 paste q_sample(x, t)
        where ``change`` is 0, one DDPM step (no noise after the last); then x itself there. Returns (the
        counterfactual in [0, 1], the noised starting point mapped to [0, 1] and clamped)."""
        import torch

        d = self.model.diffusion
        shape = tuple(x.shape[1:])
        # the refinement is forward-only: it runs on --backend (the filter above keeps its gradients in torch)
        self.prior = pixel_forward(self.context, self.model, shape)
        xm = x * 2 - 1
        with torch.no_grad():
            z = d.q_sample(pe * 2 - 1, self.tau - 1, self._draw(noise, rows, shape, [("refine_q_sample", ())])[:, 0])
            start = ((z + 1) / 2).clamp(0, 1)
            for i in range(self.tau - 1, -1, -1):
                # the known region's q_sample noise, then the DDPM step's
                eps = self._draw(noise, rows, shape, [("refine_known", (i,)), ("refine_step", (i,))])
                z = change * z + (1 - change) * d.q_sample(xm, i, eps[:, 0])
                z, _ = d.ddpm_step(self.prior(z, i), z, i, noise=eps[:, 1], clip_denoised=True)
        # outside the mask the input's own values (an exact copy, not the authors' (2x − 1 + 1)/2 float trip)
        return torch.where(change > 0.5, ((z + 1) / 2).clamp(0, 1), x), start

    def working_size(self) -> tuple[int, int]:
        return self.model.size  # the prior's: cfx brings the inputs to it

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        import torch

        p = self.params
        n = len(batch.ids)
        x = batch.images.clamp(0, 1)  # at the prior's size (working_size)
        region = batch.masks
        noise = self.context.noise.for_batch(batch.ids, batch.seeds, self.context.device)
        rows = list(range(n))
        if self.trace is not None:
            self.trace.clear()  # this batch's intermediates only

        self.filter_model = self.gradient_model(x)
        self.amp = self.precision(x)
        pe = self.pre_explanation(x, batch.targets, region, noise, rows)
        mask, dilated, change = self.masks(x, pe, region)
        refined, start = self.refine(x, pe, change, noise, rows)
        if self.trace is not None:
            self.trace.update(mask=mask, dilated_mask=dilated, inpaint_mask=1 - change,
                              noisy_pre_explanation=start, counterfactual=refined)
        # outside the mask the output *is* the input (exact copy, no float trip)
        mask_b = change
        if batch.masks is not None:
            mask_b = mask_b * batch.masks
        cf = torch.where(mask_b > 0.5, refined.clamp(0, 1), batch.images)
        nfe_model, nfe_clf = nfe_per_image(p["iterations"], self.tau)
        params = {"attack": p["attack"], "iterations": p["iterations"], "tau": self.tau,
                  "respacing": p["respacing"], "schedule": self.model.schedule_summary(), "distance": p["distance"],
                  "lambda_d": p["lambda_d"], "class_weight": p["class_weight"], "threshold": p["threshold"],
                  "dilation": p["dilation"], "model": self.model_spec, "nfe_model": nfe_model,
                  "nfe_classifier": nfe_clf, "backend": self.prior.backend.name,
                  "gradients": describe(self.amp, self.filter_model.net)}
        return [ExplainOutput(counterfactual=cf[i], mask=mask_b[i], nfe=nfe_model + nfe_clf,
                              params=dict(params, mask_fraction=round(float(mask_b[i].mean()), 4)),
                              extras={"pre_explanations": pe[i]})
                for i in range(n)]


def dilate(mask, kernel: int):
    """Max filter of odd width ``kernel`` (ACE's dilation), keeping the size."""
    import torch.nn.functional as F

    if kernel <= 1:
        return mask
    return F.max_pool2d(mask, kernel, stride=1, padding=kernel // 2)


@hookimpl
def register_explainers(register):
    register(ACE)
