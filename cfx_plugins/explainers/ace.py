"""``ace``: Adversarial Counterfactual Explanations (Jeanneret et al., CVPR 2023; thesis ch. 4 + appendix A).

1. Pre-explanation: an adversarial attack (PGD; GD and C&W as alternatives) on
   L_class(C(F_τ(x')), y') + λ_d·d(x', x), where F_τ noises x' to step τ of a respaced schedule and runs the
   stochastic DDPM chain back to 0; gradients flow through the whole chain (optionally checkpointed per step).
2. Mask: Σ_channels |x − x'|, normalised by its maximum, dilated (15×15 max filter), thresholded.
3. Refinement (RePaint-style): noise x' to τ, denoise while pasting q_sample(x, t) outside the mask.
Choices and their sources: docs/methods/ace.md.
"""

from __future__ import annotations

from cfx_cli.backends.pixel import pixel_forward
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.hookspecs import hookimpl
from cfx_cli.models import pixel_prior
from cfx_cli.params import Param

_CW_C = 1e-5  # the authors' constant keeping tanh away from ±1 (C&W parametrisation)


def nfe_per_image(iterations: int, tau: int) -> tuple[int, int]:
    """(diffusion-network, classifier) evaluations per image: τ per attack iteration plus τ for the refinement;
    one classifier gradient per iteration."""
    return iterations * tau + tau, iterations


class ACE(Explainer):
    name = "ace"
    summary = "ACE: adversarial attack through a diffusion filter, then RePaint refinement (thesis ch. 4)"
    requires = frozenset({"gradients"})
    uses_region = True
    uses_backend = True  # the diffusion UNet's forward-only calls (cfx_cli.backends.pixel)
    params = (
        Param("attack", "str", "pgd", "optimiser of the pre-explanation: 'pgd' (sign steps), 'gd' (plain "
              "gradient steps), 'cw' (Carlini–Wagner tanh parametrisation and margin loss)",
              choices=("pgd", "gd", "cw")),
        Param("iterations", "int", 50, "attack iterations (thesis: 50; ImageNet 100)", min=1),
        Param("step", "float", 1 / 255, "attack step size (accepts fractions like 1/255)", min=0.0),
        Param("epsilon", "float", 1.0, "ℓ∞ bound around the input for pgd/gd (1 = unbounded, as published)",
              min=0.0, max=1.0),
        Param("tau", "int", 5, "τ: steps of the respaced schedule the filter F_τ noises and denoises", min=1),
        Param("respacing", "str", "50", "steps kept from the model's training schedule (guided-diffusion "
              "timestep_respacing; '' = as loaded)"),
        Param("distance", "str", "l1", "d(x', x): 'l1' (Σ|x − x'|) or 'l2' (‖x − x'‖₂)", choices=("l1", "l2")),
        Param("lambda_d", "float", 0.001, "λ_d: distance weight (thesis: 0.001 for ℓ1, 0.1 for ℓ2)", min=0.0),
        Param("threshold", "float", 0.15, "binarisation threshold of the dilated, max-normalised difference "
              "(0 = change everywhere: no refinement mask)", min=0.0, max=1.0),
        Param("dilation", "int", 15, "side of the square max filter dilating the difference (odd)", min=1),
        Param("stochastic", "bool", True, "sample noise in the filter and the refinement (False: means only)"),
        Param("checkpoint", "bool", False, "gradient checkpointing over the filter's DDPM steps (recomputes "
              "each step in the backward pass: less memory, ~1 more forward per step)"),
    )
    presets = {
        # appendix A + the authors' scripts/*-attack.sh (PGD, 50 iterations, ℓ1 λ_d 0.001)
        "celeba": {"respacing": "50", "tau": 5, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                   "threshold": 0.15},
        "celebahq": {"respacing": "25", "tau": 5, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                     "threshold": 0.15},
        "bdd": {"respacing": "100", "tau": 5, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                "threshold": 0.05},
        "imagenet": {"respacing": "25", "tau": 5, "iterations": 100, "distance": "l1", "lambda_d": 0.001,
                     "threshold": 0.15},
        # the embedded 16×16 demo (1000-step pixel DDPM): tuned here, see docs/methods/ace.md
        "digits": {"respacing": "50", "tau": 5, "iterations": 50, "distance": "l1", "lambda_d": 0.001,
                   "threshold": 0.15, "dilation": 3},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Jeanneret, Simon & Jurie, "Adversarial Counterfactual Visual Explanations" (CVPR 2023; thesis ch. 4, app. A).
Pre-explanation x' (starting at x): `iterations` steps of the chosen attack on
CE(C(F_τ(x')), y') + λ_d·d(x', x), where F_τ(x') = q_sample(x', τ) followed by the stochastic DDPM chain from
τ to 0 on the respaced schedule, differentiated through every step (checkpoint=true recomputes each step in
the backward pass). PGD: x' ← clip(x' − step·sign(∇), 0, 1), no ε-ball unless epsilon < 1.
Mask: m = Σ_c|x − x'| / max, dilated with a `dilation`² max filter, changed where ≥ threshold.
Refinement: x' noised to τ, then for t = τ … 1: x'_t ← m⊙x'_t + (1−m)⊙q_sample(x, t), one DDPM step.
Output m⊙x'_0 + (1−m)⊙x: identical to the input outside the mask. With --mask M the refinement mask is m⊙M and
the attack only moves pixels inside M. Saved: masks/ (m) and pre_explanations/ (x').

Prior: --model adm:PATH.pt --model-flags "…", diffusers:FOLDER, or demo:pixel (default). Presets follow
appendix A and the authors' scripts (celeba 5/50, celebahq 5/25, bdd 5/100 threshold 0.05, imagenet 5/25 with
100 iterations); for ℓ2 set distance=l2 lambda_d=0.1 (CelebA-HQ thresholds: smile 0.1, age 0.05; BDD 0.1).
NFE per image: iterations·τ + τ prior evaluations + iterations classifier gradients. Details:
docs/methods/ace.md.
"""

    def __init__(self, context) -> None:
        super().__init__(context)
        p = self.params
        if p["tau"] < 1 or p["iterations"] < 0:
            raise UsageError("ace: tau must be ≥ 1 and iterations ≥ 0")
        if p["dilation"] < 1 or p["dilation"] % 2 == 0:
            raise UsageError(f"ace: --set dilation={p['dilation']}: must be an odd number ≥ 1")
        self.model, self.model_spec = pixel_prior(context, p["respacing"], "ace")
        if p["tau"] > self.model.diffusion.num_steps:
            raise UsageError(f"ace: --set tau={p['tau']} exceeds the {self.model.diffusion.num_steps} steps of "
                             f"the respaced schedule (respacing={p['respacing']!r})")

    # -- the diffusion filter F_τ --------------------------------------------------------------------------
    def _draw(self, noise, rows, shape, keys):
        """(N, len(keys), C, H, W): the draws ``keys`` (name, index) of each image, taken together (zeros when
        not stochastic)."""
        import torch

        if not self.params["stochastic"]:
            return torch.zeros((len(rows), len(keys), *shape), device=noise.device)
        return noise.randn_block(rows, shape, keys)

    def _filter_keys(self, iteration: int):
        """The draws of one pass of F_τ: the q_sample draw, then one per DDPM step."""
        steps = range(self.params["tau"] - 1, -1, -1)
        return [("filter_q_sample", (iteration,))] + [("filter_step", (iteration, i)) for i in steps]

    def _step(self, z, i: int, eps):
        z, _ = self.model.diffusion.ddpm_step(self.model(z, i), z, i, noise=eps, clip_denoised=True)
        return z

    def _filter(self, x01, draws):
        """F_τ(x') for x' in [0, 1], returned in [0, 1]; differentiable w.r.t. x' through every step."""
        from torch.utils.checkpoint import checkpoint

        tau = self.params["tau"]
        z = self.model.diffusion.q_sample(x01 * 2 - 1, tau - 1, draws[:, 0])
        for k, i in enumerate(range(tau - 1, -1, -1), start=1):
            if self.params["checkpoint"] and z.requires_grad:
                z = checkpoint(self._step, z, i, draws[:, k], use_reentrant=False)
            else:
                z = self._step(z, i, draws[:, k])
        return (z + 1) / 2

    # -- step 1: pre-explanation -------------------------------------------------------------------------
    def _loss(self, x_adv, x, targets, draws):
        import torch.nn.functional as F

        p = self.params
        logits = self.context.classifier.logits(self._filter(x_adv, draws))
        t = targets.to(logits.device)
        if p["attack"] == "cw":  # margin: max_{j≠y'} logit_j − logit_{y'}, floored at 0
            target_logit = logits.gather(1, t[:, None])[:, 0]
            others = logits.masked_fill(F.one_hot(t, logits.shape[1]).bool(), float("-inf")).amax(1)
            loss = F.relu(others - target_logit).sum()
        else:  # cross-entropy per image (sum: each image's gradient is its own, whatever the batch)
            loss = F.cross_entropy(logits, t, reduction="sum")
        if p["lambda_d"]:
            diff = (x_adv - x).reshape(len(x), -1)
            if p["distance"] == "l1":
                dist = diff.abs().sum()
            else:  # ‖·‖₂ per image; a tiny floor keeps its gradient finite at x' = x
                dist = (diff.pow(2).sum(1) + 1e-20).sqrt().sum()
            loss = loss + p["lambda_d"] * dist
        return loss

    def _pre_explanation(self, x, targets, region, noise, rows):
        import torch

        p = self.params
        shape = tuple(x.shape[1:])
        move = region if region is not None else torch.ones_like(x[:, :1])
        x_adv = x.clone()
        if p["attack"] == "cw":
            w = torch.atanh(2 * x / (1 + _CW_C) - 1)
        for it in range(p["iterations"]):
            draws = self._draw(noise, rows, shape, self._filter_keys(it))
            with torch.enable_grad():
                if p["attack"] == "cw":
                    w_in = w.detach().requires_grad_(True)
                    x_in = (torch.tanh(w_in) + 1) * (_CW_C + 0.5)
                    (grad,) = torch.autograd.grad(self._loss(x_in, x, targets, draws), w_in)
                else:
                    x_in = x_adv.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(self._loss(x_in, x, targets, draws), x_in)
            with torch.no_grad():
                if p["attack"] == "cw":
                    w = (w - p["step"] * grad * move).clamp(-3, 3)
                    x_adv = (torch.tanh(w) + 1) * (_CW_C + 0.5)
                    continue
                update = grad.sign() if p["attack"] == "pgd" else grad
                x_adv = x_adv - p["step"] * update * move
                x_adv = torch.min(torch.max(x_adv, x - p["epsilon"]), x + p["epsilon"]).clamp(0, 1)
        return x_adv.clamp(0, 1).detach()

    # -- steps 2–3: mask and refinement --------------------------------------------------------------------
    def _mask(self, x, pe, region):
        diff = (x - pe).abs().sum(1, keepdim=True)
        peak = diff.reshape(len(x), -1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        mask = (dilate(diff / peak, self.params["dilation"]) >= self.params["threshold"]).float()
        return mask * region if region is not None else mask

    def _refine(self, x, pe, mask, noise, rows):
        """RePaint-style: start from q_sample(x', τ); before each step paste q_sample(x, t) outside the mask."""
        import torch

        p = self.params
        d = self.model.diffusion
        shape = tuple(x.shape[1:])

        # the refinement is forward-only: it runs on --backend (the filter above keeps its gradients in torch)
        self.prior = pixel_forward(self.context, self.model, shape)
        xm = x * 2 - 1
        with torch.no_grad():
            z = d.q_sample(pe * 2 - 1, p["tau"] - 1, self._draw(noise, rows, shape, [("refine_q_sample", ())])[:, 0])
            for i in range(p["tau"] - 1, -1, -1):
                # the known region's q_sample noise, then the DDPM step's
                eps = self._draw(noise, rows, shape, [("refine_known", (i,)), ("refine_step", (i,))])
                z = mask * z + (1 - mask) * d.q_sample(xm, i, eps[:, 0])
                z, _ = d.ddpm_step(self.prior(z, i), z, i, noise=eps[:, 1], clip_denoised=True)
        return ((z + 1) / 2).clamp(0, 1)

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

        pe = self._pre_explanation(x, batch.targets, region, noise, rows)
        mask = self._mask(x, pe, region)
        refined = self._refine(x, pe, mask, noise, rows)
        # outside the mask the output *is* the input (exact copy, no float trip)
        mask_b = mask
        if batch.masks is not None:
            mask_b = mask_b * batch.masks
        cf = torch.where(mask_b > 0.5, refined.clamp(0, 1), batch.images)
        nfe_model, nfe_clf = nfe_per_image(p["iterations"], p["tau"])
        params = {"attack": p["attack"], "iterations": p["iterations"], "tau": p["tau"],
                  "respacing": p["respacing"], "schedule": self.model.schedule_summary(), "distance": p["distance"],
                  "lambda_d": p["lambda_d"], "threshold": p["threshold"], "dilation": p["dilation"],
                  "model": self.model_spec, "nfe_model": nfe_model, "nfe_classifier": nfe_clf,
                  "backend": self.prior.backend.name}
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
