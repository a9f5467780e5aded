"""An example cfx plugin: one explainer and one metric.

Registration is cheap: nothing heavy is imported at module level; torch and numpy are imported
inside the methods that use them.
"""

from __future__ import annotations

from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_cli.params import Param


class PatchSearch(Explainer):
    """Greedy black-box search: fill, one at a time, the patch that raises the target probability
    most. Needs only probabilities, so it works with any classifier (HTTP, cmd, ONNX...)."""

    name = "patch_search"
    summary = "greedy black-box patch filling (example plugin)"
    requires = frozenset()  # black-box: probabilities only
    params = (
        Param("patch", "int", 4, "patch size in pixels"),
        Param("steps", "int", 6, "maximum number of patches to fill"),
        Param("fill", "float", 1.0, "fill value in [0, 1]"),
    )

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        import torch

        clf = self.context.classifier
        p, fill = self.params["patch"], self.params["fill"]
        outputs = []
        for img, target in zip(batch.images, batch.targets, strict=True):
            current, nfe = img.clone(), 0
            _, h, w = img.shape
            for _ in range(self.params["steps"]):
                candidates = []
                for y in range(0, h, p):
                    for x in range(0, w, p):
                        cand = current.clone()
                        cand[:, y:y + p, x:x + p] = fill
                        candidates.append(cand)
                probs = clf.predict_proba(torch.stack(candidates))
                nfe += len(candidates)
                best = int(probs[:, int(target)].argmax())
                current = candidates[best]
                if int(probs[best].argmax()) == int(target):
                    break
            outputs.append(ExplainOutput(counterfactual=current, params=dict(self.params), nfe=nfe))
        return outputs


class ChangedPixels(Metric):
    name = "changed_pixels"
    summary = "share of pixels changed by more than 1/255 (sparsity of the edit)"
    lower_is_better = True

    def compute(self, run, context):
        import numpy as np

        recs = run.explained(required=True)  # none → MetricUnavailable: `cfx eval` skips this metric
        shares = [float((np.abs(run.image(r["counterfactual"]) - run.image(r["original"])).max(axis=2)
                         > 1.5 / 255).mean()) for r in recs]
        return {"changed_pixels": float(np.mean(shares))}


@hookimpl
def register_explainers(register):
    register(PatchSearch)


@hookimpl
def register_metrics(register):
    register(ChangedPixels)
