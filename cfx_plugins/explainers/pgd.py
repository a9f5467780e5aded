"""``pgd``: the masked PGD baseline (thesis §3.5.2, eq. 3.22).

x'_{i+1} = Π_{B∞(x, ε)}(x'_i − M ⊙ γ · sign(∇ L_class)), with L_class the cross-entropy of the
target class. An adversarial example, not an explanation: the reference every method must beat on
realism, and the plumbing check of the tool.
"""

from __future__ import annotations

from cfx_cli.backends.grad import GradCheck, describe, grad_precision
from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.guide import GUIDE_PARAMS
from cfx_cli.hookspecs import hookimpl
from cfx_cli.params import Param


class MaskedPGD(Explainer):
    name = "pgd"
    summary = "masked PGD baseline (adversarial attack, thesis eq. 3.22)"
    requires = frozenset({"gradients"})
    uses_region = True
    gradient_options = frozenset({"precision"})  # the classifier's forward and backward under autocast
    params = (
        Param("eps", "float", 8 / 255, "ℓ∞ radius ε of the attack (accepts fractions like 8/255)",
              min=0.0, max=1.0),
        Param("step", "float", 1 / 255, "step size γ per iteration", min=0.0),
        Param("iterations", "int", 50, "number of PGD iterations", min=1),
        Param("early_stop", "bool", False, "stop updating an image once the classifier predicts the target"),
        *GUIDE_PARAMS,
    )
    presets = {
        "eps2": {"eps": 2 / 255},
        "eps4": {"eps": 4 / 255},
        "eps8": {"eps": 8 / 255},
        # 16×16 digits need a larger ball: at 8/255 the demo CNN flips none of the demo images
        "digits": {"eps": 32 / 255, "step": 2 / 255},
    }
    auto_presets = {"demo:digits": "digits"}
    description = """
Projected gradient descent on the target's cross-entropy inside an ℓ∞ ball of radius ε around the
input, restricted to the region M when --mask is given (M = 1 everywhere otherwise), 50 iterations
as in the thesis with ε ∈ {2, 4, 8}/255 (presets eps2/eps4/eps8). The thesis does not state γ; cfx
uses 1/255, the step of ACE's PGD. Images stay in [0, 1].
"""

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        import torch
        import torch.nn.functional as F

        p = self.params
        clf = self.context.classifier
        x = batch.images.detach()
        mask = batch.masks if batch.masks is not None else torch.ones_like(x[:, :1])
        # --precision fp16/bf16: the classifier's gradient calls under autocast, once they pass the gate
        amp = grad_precision(self.context, [GradCheck(clf.spec or "the classifier", clf.logits, (x[:1],))],
                             key=("classifier", id(clf), tuple(x.shape[1:])))
        x_adv = x.clone()
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        nfe = torch.zeros(len(x), dtype=torch.long)
        for _ in range(p["iterations"]):
            x_adv.requires_grad_(True)
            with amp.autocast():
                logits = clf.logits(x_adv).float()
            nfe += active.cpu().long()
            if p["early_stop"]:
                active = active & (logits.argmax(1) != batch.targets)
                if not active.any():
                    break
            loss = F.cross_entropy(logits, batch.targets, reduction="sum")
            (grad,) = amp.grad(loss, x_adv)
            with torch.no_grad():
                step = mask * p["step"] * grad.sign() * active[:, None, None, None]
                x_adv = x_adv - step
                x_adv = torch.min(torch.max(x_adv, x - p["eps"]), x + p["eps"]).clamp(0, 1)
        x_adv = x_adv.detach()
        return [
            ExplainOutput(counterfactual=x_adv[i], mask=batch.masks[i] if batch.masks is not None else None,
                          params={"eps": p["eps"], "step": p["step"], "iterations": p["iterations"],
                                  "gradients": describe(amp)},
                          nfe=int(nfe[i]))
            for i in range(len(x))
        ]


@hookimpl
def register_explainers(register):
    register(MaskedPGD)
