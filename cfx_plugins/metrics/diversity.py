"""σ_L (DiME eq. 3.20): mean pairwise LPIPS between the counterfactuals of the same input from several seeds.

Reads the layout ``cfx explain --seeds N`` writes: RUN_DIR (first seed) and RUN_DIR/seeds/K/, paired by
input id. All counterfactuals count, successful or not, and the original is excluded (thesis §3.4.6).
σ_L = (1/N) Σ_i 2/(n(n−1)) Σ_{j<k} LPIPS(x_j^i, x_k^i) over the inputs explained by at least two seeds.

LPIPS v0.1 with the VGG trunk (ACE's ``compute_LPIPS.py``; ``--set lpips_net=alex`` for AlexNet) needs two
local files: the trunk (``--set lpips_backbone=PATH`` / ``CFX_LPIPS_BACKBONE``: torchvision's
``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth``) and the linear layers (``--set lpips_weights=PATH`` /
``CFX_LPIPS_WEIGHTS``: ``vgg.pth`` or ``alex.pth`` from lpips ``weights/v0.1``).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_plugins.nets.weights import WeightsSpec, option, resolve


def seed_runs(run) -> list:
    """The run itself and its per-seed sub-runs (RUN_DIR/seeds/K with a manifest), in K order."""
    from cfx_cli.runs import RunData, seed_run_dirs

    return [run] + [RunData.load(p) for p in seed_run_dirs(run.path)]


def grouped_counterfactuals(runs) -> dict[str, list[tuple]]:
    """id → [(run, counterfactual relpath), ...] for ids with a counterfactual in at least two runs."""
    groups: dict[str, list[tuple]] = {}
    for r in runs:
        for rec in r.explained():
            groups.setdefault(rec["id"], []).append((r, rec["counterfactual"]))
    return {k: v for k, v in groups.items() if len(v) >= 2}


def sigma_l(groups: dict[str, list[tuple]], distance) -> float:
    """Mean over inputs of the mean pairwise distance; ``distance(a, b)`` takes two (H, W, 3) arrays."""
    per_input = []
    for items in groups.values():
        imgs = [r.image(p) for r, p in items]
        pairs = [distance(a, b) for a, b in combinations(imgs, 2)]
        per_input.append(float(np.mean(pairs)))
    return float(np.mean(per_input))


class SigmaL(Metric):
    name = "sigma_l"
    summary = "σ_L diversity: mean pairwise LPIPS between counterfactuals of one input from several seeds"
    needs = frozenset({"seeds", "lpips weights"})
    default = False
    lower_is_better = False
    unranked = frozenset({"sigma_l_inputs", "sigma_l_seeds"})

    def compute(self, run, context):
        import torch

        from cfx_plugins.nets import lpips
        from cfx_plugins.nets.features import rgb

        groups = grouped_counterfactuals(seed_runs(run))
        if not groups:
            raise MetricUnavailable("needs several seeds per input: run `cfx explain --seeds N` (N ≥ 2)")
        net = str(option(context, "lpips_net", "CFX_LPIPS_NET", "vgg"))
        if net not in lpips.NETS:
            raise MetricUnavailable(f"lpips_net={net!r}: expected vgg or alex")
        _, _, trunk_file, trunk_url = lpips.NETS[net]
        trunk = resolve(context, WeightsSpec("lpips_backbone", "CFX_LPIPS_BACKBONE", trunk_file, trunk_url))
        lin = resolve(context, WeightsSpec("lpips_weights", "CFX_LPIPS_WEIGHTS", f"{net}.pth (v0.1)",
                                           lpips.LIN_URL))
        model = lpips.load(net, trunk, lin).to(context.device)

        def distance(a, b):
            ta = torch.from_numpy(rgb(a)).permute(2, 0, 1)[None].float().to(context.device)
            tb = torch.from_numpy(rgb(b)).permute(2, 0, 1)[None].float().to(context.device)
            with torch.no_grad():
                return float(model(lpips.resize_for(model, ta), lpips.resize_for(model, tb))[0])

        n_seeds = max(len(v) for v in groups.values())
        return {"sigma_l": sigma_l(groups, distance), "sigma_l_inputs": len(groups), "sigma_l_seeds": n_seeds}


@hookimpl
def register_metrics(register):
    register(SigmaL)
