"""``rcsb``: Region-Constrained Counterfactual Schrödinger Bridges (Sobieski et al., ICLR 2025).

Conditional inpainting of the region R with an I2SB inpainting bridge, guided by the classifier, computing what
the authors' code computes (``CDDB.inpaint`` with ``deep=True`` → ``Diffusion.ddpm_dps_sampling`` and the
``cond_fn`` of ``CDDBTargetClassifierLPIPS``; matched by tests/test_rcsb_e2e.py). Per OT-ODE step from the
truncation step down to 0: Tweedie estimate x̂_0(x_t) from the bridge network; g = ∇_{x_t} log f(y' | m(x̂_0))
through the network (m: the per-image min–max of the whole x̂_0); Adam on the full-image g; divided by the first
step's per-image norm (adaptive normalization); x_t ← x_t + s·g; OT-ODE posterior step; the known part pasted
from the truncated start. All bridge math comes from :mod:`cfx_cli.diffusion.bridge`. Choices, sources and the
options that keep cfx's earlier variant: docs/methods/rcsb.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cfx_cli.backends.grad import FP32, GradCheck, describe, grad_model, grad_precision
from cfx_cli.backends.pixel import network_output
from cfx_cli.classifiers import target_score
from cfx_cli.errors import UsageError
from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.guide import GUIDE_PARAMS
from cfx_cli.hookspecs import hookimpl
from cfx_cli.models import DEFAULT_MODELS, model_for
from cfx_cli.params import Param


class RCSB(Explainer):
    name = "rcsb"
    summary = "RCSB: region-constrained counterfactuals with a guided I2SB inpainting bridge (ICLR 2025)"
    requires = frozenset({"gradients"})
    uses_region = True
    #: without --region, RCSB uses the automatic Integrated-Gradients region (the paper's default setting)
    default_region = "auto"
    # the guided bridge steps: network and classifier under --precision (autocast), the bridge network through
    # --channels-last / --compile
    gradient_options = frozenset({"precision", "channels_last", "compile"})
    params = (
        Param("tau", "float", 0.6, "τ: trajectory truncation; the code's start_step = round(τ·interval), the "
              "start state and the first step at start_step − 1 (1.0 = from x_1, the full inpainting trajectory)",
              min=0.0, max=1.0),
        Param("nfe", "int", 100, "OT-ODE steps from the start down to 0 (one bridge evaluation each)", min=1),
        Param("scale", "float", 1.5, "s: guidance scale", min=0.0),
        Param("tweedie", "bool", True, "take the classifier gradient at the Tweedie estimate x̂_0(x_t) through "
              "the network (false: at x_t itself, the 'naive' guidance)"),
        Param("adam", "bool", True, "Adam stabilization of the gradient (β 0.9/0.999, ε 1e-8, reset per image)"),
        Param("adaptive_norm", "bool", True, "divide every update by the norm of the first one (per image)"),
        Param("clf_view", "str", "minmax", "what the classifier sees: minmax = the whole x̂_0 through a per-image "
              "min–max (the code); paste = R⊙x̂_0 + (1−R)⊙x through (x+1)/2 (cfx's earlier view)",
              choices=("minmax", "paste")),
        Param("mask_grad", "bool", False, "multiply the gradient by R before Adam and the norm (cfx's earlier "
              "variant; the code uses the full-image gradient and the paste confines the update)"),
        Param("float64", "bool", True, "hold the bridge state in float64 as the code does (the networks run in "
              "float32; off, or on MPS: float32)"),
        Param("beta1", "float", 0.9, "Adam β1", min=0.0, max=1.0),
        Param("beta2", "float", 0.999, "Adam β2", min=0.0, max=1.0),
        Param("eps", "float", 1e-8, "Adam ε", min=0.0),
        Param("clip_denoise", "bool", False, "clip x̂_0 to [-1, 1] (I2SB's sampler default is off)"),
        *GUIDE_PARAMS,
    )
    # Table 1 configurations (ImageNet, I2SB freeform 20–30% checkpoint); a and c are region options
    presets = {
        "A": {"scale": 3.0, "tau": 0.6, "nfe": 100},
        "B": {"scale": 1.5, "tau": 0.6, "nfe": 100},
        "C": {"scale": 1.5, "tau": 0.6, "nfe": 100},
        # the embedded 16×16 demo bridge, tuned on the demo's tuning digits (docs/methods/rcsb.md): a region of
        # a 0.55 (below) to redraw the digit in, DVCE's robust guidance (cone 30°) so the edit is a digit, not an
        # attack on the CNN, and s 1.25 (the robust direction needs less step than the CNN's own)
        "digits": {"scale": 1.25, "tau": 0.6, "nfe": 20, "guide": "demo:digits-robust", "guide_cone": 30.0},
    }
    region_presets = {
        "A": {"region_area": 0.1, "region_cell": 4},
        "B": {"region_area": 0.2, "region_cell": 4},
        "C": {"region_area": 0.3, "region_cell": 4},
        "digits": {"region_area": 0.55, "region_cell": 2},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Sobieski, Grzywaczewski, Sadlej, Tyszkiewicz, Biecek, "Rethinking Visual Counterfactual Explanations Through
Region Constraint" (ICLR 2025). Only the region R may change: the counterfactual equals the input outside R
exactly. R comes from --region: `auto` (default; Integrated Gradients of the predicted class in c×c cells
covering a fraction a of the area: --set region_area=0.3 --set region_cell=4), a mask image or folder, or a
plugin's SCHEME:ARG (e.g. a text-prompted segmenter).

Prior: an I2SB inpainting bridge (--model i2sb:PATH.pt, e.g. NVlabs' "inpaint-freeform2030" ImageNet
checkpoint; β_max from its options, else 1.0 as in the authors' configs) or the embedded demo:bridge when --model
is absent. x_1 = x outside R, N(0, 1) inside (I2SB's inpainting corruption); sampling starts at step
round(τ·T) − 1 on the bridge between x and x_1 (OT-ODE mean, float64 state). Each step: x̂_0 = x_t −
σ_t·net(x_t); g = ∇_{x_t} log softmax(f(minmax(x̂_0)))[y'] (the whole x̂_0, per-image min–max to [0, 1]);
g ← Adam(g) on the full image; g ← g / ‖g_first‖; x_t ← x_t + s·g; x_{t−1} = OT-ODE posterior step(x_t, x̂_0);
paste the known part of the start state back. cfx's earlier variant: --set clf_view=paste --set mask_grad=true
(and --set region_rule=cfx for its region rule). Presets: A (a 0.1, c 4, s 3, τ 0.6), B (a 0.2, c 4,
s 1.5), C (a 0.3, c 4, s 1.5) from the paper's Table 1; digits for the demo (a 0.55, c 2, s 1.25, robust
guidance --set guide=demo:digits-robust guide_cone=30). The switches tweedie/adam/adaptive_norm and tau=1
reproduce the ablation of the paper's Fig. 3 (bench/rcsb_ablation.py). NFE per image: nfe bridge + nfe classifier
gradients.
"""

    def __init__(self, context) -> None:
        super().__init__(context)

        p = self.params
        if not 0 < p["tau"] <= 1:
            raise UsageError(f"rcsb: --set tau={p['tau']}: must be in (0, 1]")
        self.model_spec = context.model or DEFAULT_MODELS["bridge"]
        self.model = self.loaded = model_for(context, "bridge", "rcsb")  # model: with the gradient network (below)
        # the step of the start state and of the first network call (the code's start_step − 1)
        self.first_step = self.model.bridge.truncation_step(p["tau"])
        self.amp = FP32  # what the guided steps run in (set per batch by explain, from --precision)
        if not 1 <= p["nfe"] <= self.first_step:
            raise UsageError(f"rcsb: --set nfe={p['nfe']}: must be in 1…{self.first_step} for tau={p['tau']}")

    def working_size(self) -> tuple[int, int]:
        return self.model.size  # the bridge's: cfx brings the inputs to it

    def explain(self, batch: ExplainBatch, trace: RCSBTrace | None = None) -> list[ExplainOutput]:
        """The counterfactuals of ``batch``; ``trace`` (optional) receives every intermediate of the sampler."""
        import torch

        if batch.masks is None:
            raise UsageError("rcsb needs a region: --region auto|FILE|DIR")
        p = self.params
        dev = self.model.device
        x = (batch.images.clamp(0, 1).to(dev) - 0.5) * 2  # at the bridge's size (working_size); its space, [-1, 1]
        region = (batch.masks > 0.5).float().to(dev)
        draws = self.context.noise.for_batch(batch.ids, batch.seeds, dev)
        noise = draws.randn(range(len(batch.ids)), tuple(x.shape[1:]), "x1")  # R's content in I2SB's corruption
        self.model = self.gradient_model(x)
        self.amp = self.precision(x)
        out = self.sample(x, region, batch.targets.to(dev), noise, trace)
        cf = (out.clamp(-1, 1) / 2 + 0.5).float().to(batch.images.device)  # what the code returns
        # the hard constraint: outside R the counterfactual is the input, bit for bit
        cf = torch.where(batch.masks > 0.5, cf, batch.images)
        nfe = 2 * p["nfe"]
        info = {"tau": p["tau"], "start_step": self.first_step + 1, "nfe": p["nfe"], "scale": p["scale"],
                "tweedie": p["tweedie"], "adam": p["adam"], "adaptive_norm": p["adaptive_norm"],
                "clf_view": p["clf_view"], "mask_grad": p["mask_grad"], "model": self.model_spec,
                "gradients": describe(self.amp, self.model.net)}
        return [ExplainOutput(counterfactual=cf[i].detach(), mask=batch.masks[i], params=dict(info), nfe=nfe)
                for i in range(len(batch.ids))]

    def gradient_model(self, x):
        """The bridge the guided steps differentiate: its network as ``--channels-last`` / ``--compile`` ask
        (:func:`cfx_cli.backends.grad.grad_model`, gated against the loaded one), else the loaded bridge."""
        import torch

        base = self.loaded
        channels = x.shape[1] * (2 if base.cond_x1 else 1)
        example = (torch.zeros((1, channels, *x.shape[-2:]), device=x.device), torch.zeros((1,), device=x.device))
        return grad_model(self.context, base, "net", network_output, example, f"{self.model_spec} (bridge)")

    def precision(self, x):
        """What the guided steps run in: ``--precision`` under autocast once the bridge network and the classifier
        pass the gate (:mod:`cfx_cli.backends.grad`), else fp32."""
        clf = self.context.classifier
        one = x[:1].float()
        checks = [GradCheck(f"{self.model_spec} (bridge)", lambda z: self.model(z, self.first_step), (one,)),
                  GradCheck(clf.spec or "the classifier", clf.logits, ((one[:1] + 1) / 2,))]
        return grad_precision(self.context, checks, key=("rcsb", id(self.model.net), id(clf), tuple(x.shape[1:])))

    def classifier_view(self, seen, x, region):
        """What the classifier sees of the estimate ``seen`` (x̂_0, or x_t for naive guidance), in [0, 1]."""
        if self.params["clf_view"] == "paste":  # cfx's earlier view: the known pixels pasted, (x + 1)/2
            return ((region * seen + (1 - region) * x + 1) / 2).clamp(0, 1).float()
        return minmax01(seen.float())

    def sample(self, x, region, targets, noise, trace: RCSBTrace | None = None):
        """The guided, truncated, masked OT-ODE sampler on (N, 3, S, S) images in [-1, 1]; returns the state at
        step 0 (a posterior mean, in the state's dtype), as ``Diffusion.ddpm_dps_sampling`` of the code does."""
        import torch

        from cfx_cli.optim import adam_update

        p = self.params
        br = self.model.bridge
        clf = self.context.classifier
        # the code's state is float64 from the truncation on (float64 schedule tensors); MPS has no float64
        wide = p["float64"] and not str(x.device).startswith("mps")
        dtype = torch.float64 if wide else torch.float32
        x, region, noise = x.to(dtype), region.to(dtype), noise.to(x.device, dtype)
        x1 = (1 - region) * x + region * noise  # I2SB's inpainting corruption
        steps = br.sampling_steps(p["nfe"], self.first_step)[::-1]
        # τ = 1: the whole trajectory from x_1 (the code with start_step null); else the OT-ODE bridge mean
        x_start = br.q_sample(steps[0], x, x1, ot_ode=True) if p["tau"] < 1 else x1
        xt = x_start
        if trace is not None:
            trace.x1, trace.x_start, trace.steps = x1.float(), x_start.float(), list(steps)
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)  # Adam state, fresh for every call (elementwise: each image's own)
        first_norm = None
        for k, (step, prev) in enumerate(zip(steps[:-1], steps[1:], strict=True), start=1):
            with torch.enable_grad():
                xg = xt.detach().requires_grad_(True)
                with self.amp.autocast():
                    x0 = self.model.pred_x0(xg, step, clip_denoise=p["clip_denoise"]) if p["tweedie"] else None
                    seen = self.classifier_view(x0 if x0 is not None else xg, x, region)
                    logits = clf.logits(seen).float()
                logp = target_score(logits, targets, kind="log_softmax")
                (grad,) = self.amp.grad(logp.sum(), xg)
            g = grad * region if p["mask_grad"] else grad  # the code: the full-image gradient
            if p["adam"]:  # the update direction m̂ / (√v̂ + ε) (lr 1)
                m, v, g = adam_update(m, v, g, k, (p["beta1"], p["beta2"]), p["eps"])
            g_adam = g
            if p["adaptive_norm"]:  # the first step's per-image norm, taken in float32 as the code does
                if first_norm is None:
                    first_norm = g.flatten(1).norm(dim=1).float().clamp_min(1e-12).view(-1, 1, 1, 1)
                g = g / first_norm
            update = p["scale"] * g
            with torch.no_grad():
                if x0 is None:  # naive guidance: the network runs only for the sampler
                    with self.amp.autocast():
                        x0 = self.model.pred_x0(xt, step, clip_denoise=p["clip_denoise"])
                x0 = x0.detach()
                xt = br.posterior_step(prev, step, xt.detach() + update, x0, ot_ode=True)
                xt = (1 - region) * x_start + region * xt  # the known part from the truncated start state
            if trace is not None:
                trace.record(x0, seen, grad, g_adam, update, xt)
        if trace is not None:
            trace.norm = first_norm.flatten() if first_norm is not None else None
        return xt.detach()


def minmax01(x):
    """RCSB's map of x̂_0 to the classifier's [0, 1] (``from_m1p1_to_01``): subtract the image's minimum over all
    channels and pixels, divide by the resulting maximum. The code applies it to the whole batch as soon as any
    image has a negative minimum; here each image with a negative minimum, so results do not depend on the batch
    (the same for B = 1, and whenever all or none of a batch's minima are negative)."""
    import torch

    lo = x.flatten(1).min(dim=1)[0].view(-1, 1, 1, 1)
    shifted = x - lo
    scaled = shifted / shifted.flatten(1).max(dim=1)[0].view(-1, 1, 1, 1)
    return torch.where(lo < 0, scaled, x)


@dataclass
class RCSBTrace:
    """The sampler's intermediates (float32 copies), one entry per iteration k = 0… in step order:
    ``x0hat`` the Tweedie estimate, ``clf_input`` what the classifier saw, ``grad`` the full-image gradient of
    Σ log p(y'), ``grad_adam`` after Adam, ``update`` what was added to x_t, ``xt`` the state after the paste;
    ``norm`` (N,) the adaptive normalisation's divisor."""

    x1: Any = None
    x_start: Any = None
    steps: list[int] = field(default_factory=list)
    x0hat: list = field(default_factory=list)
    clf_input: list = field(default_factory=list)
    grad: list = field(default_factory=list)
    grad_adam: list = field(default_factory=list)
    update: list = field(default_factory=list)
    xt: list = field(default_factory=list)
    norm: Any = None

    def record(self, x0hat, clf_input, grad, grad_adam, update, xt) -> None:
        for name, value in (("x0hat", x0hat), ("clf_input", clf_input), ("grad", grad), ("grad_adam", grad_adam),
                            ("update", update), ("xt", xt)):
            getattr(self, name).append(value.detach().float().cpu())


@hookimpl
def register_explainers(register):
    register(RCSB)
