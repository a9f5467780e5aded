"""``fastdime``: FastDiME (Weng, Pegios, Petersen, Feragen, Bigdeli, ECCV 2024), as the authors' CelebA code runs it.

DiME without the quadratic inner chain: the classifier's gradient is taken at the one-step (Tweedie) estimate x̂₀
of the guided step, and a mask the sampler computes from |x̂₀ − x| (after a warm-up) pastes the input, noised to the
step's level, outside the region that changes. The 2-step variants rerun the guided chain with the mask of the
first run's output held fixed. It shares DiME's prior, class loss, perceptual/l1 terms, retries over λ_c, z_τ
and manifest (it is a subclass); the fastdime-e2e fixture checks the whole algorithm. Choices and their sources:
docs/methods/fastdime.md.
"""

from __future__ import annotations

from typing import Any

from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_cli.params import Param
from cfx_plugins.explainers.dime import DiME

VARIANTS = ("fastdime", "fastdime2", "fastdime2+", "nomask")
_SELF_MASK = {"fastdime", "fastdime2+"}  # pass 0 optimises its own mask
_TWO_PASS = {"fastdime2", "fastdime2+"}  # pass 1 reruns with the mask of pass 0's output fixed


def nfe_per_attempt(tau: int, variant: str) -> tuple[int, int]:
    """(diffusion-network, classifier) evaluations of one FastDiME attempt per image: one network call and one
    classifier gradient per guided step, twice for the 2-step variants."""
    passes = 2 if variant in _TWO_PASS else 1
    return passes * tau, passes * tau


def keep_mask(x, y, dilation: int, threshold: float):
    """The authors' ``generate_mask`` + binarisation: 1 where the input is kept. d = Σ_c |x − y| on [0, 1],
    divided by its per-image maximum, max-pooled over ``dilation``² pixels, then d < ``threshold``."""
    import torch.nn.functional as F

    d = ((x + 1) / 2 - (y + 1) / 2).abs().sum(dim=1, keepdim=True)
    d = d / d.reshape(d.shape[0], -1).max(dim=1)[0].reshape(-1, 1, 1, 1)
    d = F.max_pool2d(d, dilation, stride=1, padding=(dilation - 1) // 2)
    return (d < threshold).float()


_DIME_ONLY = {"stochastic_x"}  # the inner chain FastDiME removes


class FastDiME(DiME):
    name = "fastdime"
    summary = "FastDiME: DiME with one-step clean estimates and a self-optimised mask (ECCV 2024)"
    params = tuple(p for p in DiME.params if p.name not in _DIME_ONLY) + (
        Param("variant", "str", "fastdime", "'fastdime' (self-optimised mask), 'fastdime2' (an unmasked run, "
              "then a rerun with its mask fixed), 'fastdime2+' (a masked run, then the rerun), 'nomask' (the "
              "authors' fastdimenomask: no mask at all)", choices=VARIANTS),
        Param("warmup", "int", 30, "guided steps before the self-optimised mask applies (0-based step count; "
              "the authors' warmup_step)", min=0),
        Param("dilation", "int", 5, "max-pool size that dilates the mask (odd; the authors' dilation)", min=1),
        Param("threshold", "float", 0.15, "a pixel is kept (input pasted) where its dilated, max-normalised "
              "|x̂₀ − x| is below this (the authors' masking_threshold)", min=0.0),
        Param("scale_grads", "bool", False, "divide the class and perceptual gradients by √ᾱ_t as DiME does "
              "(the authors' --scale_grads; off in their runs)"),
    )
    _celeba = {**DiME._paper, "tau": 60, "scales": (8.0, 10.0, 15.0), "warmup": 30, "dilation": 5,
               "threshold": 0.15}
    presets = {
        # run_fastdime.sh (CelebA smile, 128², 500-step ADM respaced to 200): S = 60, scales 8,10,15, λ_p = 30
        # (layer 18), λ_1 = 0.05, logits, dilation 5, threshold 0.15, warm-up 30; METHOD selects the variant
        "celeba": {**_celeba, "variant": "fastdime"},
        "celeba2": {**_celeba, "variant": "fastdime2"},
        "celeba2plus": {**_celeba, "variant": "fastdime2+"},
        # the embedded 16×16 demo: DiME's digits setting (robust guidance included), the mask after half the steps;
        # tuned on the demo's tuning digits (docs/methods/fastdime.md): τ = 20 of 85 respaced steps, a 45° cone
        # and DiME's authors' λ_1 (the mask already keeps the unchanged pixels)
        "digits": {**DiME.presets["digits"], "respacing": "85", "lambda_1": 0.05, "guide_cone": 45.0,
                   "variant": "fastdime", "warmup": 10, "dilation": 3, "threshold": 0.15},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Weng, Pegios, Petersen, Feragen & Bigdeli, "Fast Diffusion-Based Counterfactuals for Shortcut Removal and
Generation" (ECCV 2024), as the authors' CelebA code (ppegiosk/FastDiME_CelebA) runs it. Like DiME, x is noised
to z_τ = q_sample(x, τ) and guided for t = τ−1 … 0 with g = ∇[λ_c·L_class(x_t) + λ_p·L_perc(x_t, x)] +
λ_1·sign(z_t − x) (no 1/√ᾱ_t unless scale_grads), z ← μ − Σ·g + σ·ε; but x_t is the network's own clean
estimate x̂₀ of the step (one call per step instead of DiME's inner chain). From step `warmup` on, the mask
keep = [dilate(|x̂₀ − x| / max) < threshold] pastes x into x_t and x noised to level t into z_t; after the last
step z ← z·(1−keep) + x·keep. fastdime2 / fastdime2+ rerun the chain from the same z_τ with the mask of the
first run's output fixed (pasted at every step). Retries over λ_c as DiME.

With --region/--mask, the region is pasted from the first step and the self-optimised mask only acts inside it.
The mask that was used (1 = changed) is saved in masks/. NFE per attempt and image: τ network calls + τ
classifier gradients (2τ + 2τ for the 2-step variants; τ = 60: 120 vs DiME's 1890).
Presets: celeba, celeba2, celeba2plus (run_fastdime.sh), digits (the demo; with robust guidance).
Details: docs/methods/fastdime.md.
"""

    def __init__(self, context) -> None:
        super().__init__(context)
        if self.params["dilation"] % 2 != 1:
            raise UsageError(f"fastdime: --set dilation={self.params['dilation']}: must be odd (a centred "
                             "max-pool window, as the authors' generate_mask asserts)")

    def _nfe_per_attempt(self) -> tuple[int, int]:
        return nfe_per_attempt(self.params["tau"], self.params["variant"])

    def _record(self) -> dict[str, Any]:
        p = self.params
        return {"variant": p["variant"], "warmup": p["warmup"], "dilation": p["dilation"],
                "threshold": p["threshold"], "scale_grads": p["scale_grads"]}

    def _attempt(self, x, z, targets, region, x_feats, scale: float, noise, rows: list[int], attempt: int):
        """One attempt (one or two guided runs from z_τ); returns (z after t = 0, where it may differ from x)."""
        import torch

        p = self.params
        outside = None if region is None else 1 - region  # a region is kept from the first step on
        z0, keep = self._pass(x, z, targets, x_feats, scale, noise, rows, attempt, 0,
                              self_mask=p["variant"] in _SELF_MASK, fixed=outside, outside=outside)
        if p["variant"] in _TWO_PASS:
            with torch.no_grad():  # the authors' mask of the first run's raw output, held fixed in the rerun
                fixed = keep_mask(x, z0, p["dilation"], p["threshold"])
            if outside is not None:
                fixed = torch.maximum(fixed, outside)
            z0, keep = self._pass(x, z, targets, x_feats, scale, noise, rows, attempt, 1,
                                  self_mask=False, fixed=fixed, outside=outside)
        return z0, None if keep is None else 1 - keep

    def _pass(self, x, z, targets, x_feats, scale: float, noise, rows: list[int], attempt: int, pass_: int, *,
              self_mask: bool, fixed, outside):
        """One guided run t = τ−1 … 0 (the authors' FastDiME ``p_sample_loop``): (z after the last step, the
        last keep mask or None)."""
        import torch

        from cfx_cli.diffusion import broadcast

        p = self.params
        d = self.model.diffusion
        shape = tuple(x.shape[1:])
        x_t = x.clone()  # the first gradient is taken at the input itself, as DiME
        keep = None
        for jdx, i in enumerate(range(p["tau"] - 1, -1, -1)):
            self._emit("step", attempt=attempt, pass_=pass_, t=i, rows=rows, z=z, x_t=x_t)
            with torch.no_grad():
                out = self.prior(z, i)
                var = d.p_mean_variance(out, z, i, p["clip_denoised"]).variance
            g = self._clean_grad(x_t, x, targets, None, x_feats, scale)  # x_t already equals x outside the region
            if p["scale_grads"]:
                g = g / broadcast(d.sqrt_alphas_cumprod, i, x)
            if p["lambda_1"]:
                g = g + p["lambda_1"] * torch.sign(z - x)  # ∇_z λ_1‖z − x‖₁ on the noisy z
            with torch.no_grad():
                z, step = d.ddpm_step(out, z, i, noise=noise.randn(rows, shape, "guided_step", (attempt, pass_, i)),
                                      clip_denoised=p["clip_denoised"], mean_shift=-var * g)
                x_t = step.pred_x0  # Tweedie's x̂₀ of the state this step started from (the authors' Eq. 4)
                if self_mask and jdx >= p["warmup"]:
                    cur = keep_mask(x, x_t, p["dilation"], p["threshold"])
                    cur = cur if outside is None else torch.maximum(cur, outside)
                else:
                    cur = fixed
                if cur is not None:  # paste x into x_t, and x noised to the level t of this step into z
                    keep = cur
                    x_t = x_t * (1 - keep) + keep * x
                    known = d.q_sample(x, i, noise.randn(rows, shape, "mask_q_sample", (attempt, pass_, i)))
                    z = z * (1 - keep) + keep * known
        if keep is not None:
            z = z * (1 - keep) + keep * x
        self._emit("pass", attempt=attempt, pass_=pass_, rows=rows, z0=z, keep=keep)
        return z, keep


@hookimpl
def register_explainers(register):
    register(FastDiME)
