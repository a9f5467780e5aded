"""Where ECED's colour comes from: the channel spread of grayscale tuning digits after each stage (issue 22).

    OMP_NUM_THREADS=1 python bench/eced_stage_spread.py [N] [KEY=VALUE ...]     # e.g. 8 keep_gray=false

Runs ECED (preset digits, target = the second most probable class) on the first N digits of the demo's tuning split
and decodes what each stage produced with the loaded decoder D and with Alg. 2's tuned copy D*: the VAE round trip
D(E(x)), D*(E(x)), Alg. 2's background latent z^bg*, the first blended chain's z_0, and the output. Spread: max over
pixels of max_c − min_c in 8-bit levels, per image. Diagnostic only: it wraps ``core.blended_chain`` and
``core.preserve_background`` to record their results.
"""

from __future__ import annotations

import sys

import torch

import cfx_plugins.explainers.eced.core as core
from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.demo.data import load_protocol_split
from cfx_cli.explainers import ExplainBatch, ExplainContext
from cfx_cli.params import resolve_params
from cfx_plugins.explainers.eced import ECED


def spread(img: torch.Tensor) -> list[float]:
    """Per image of (N, 3, H, W) in [0, 1]: max over pixels of max_c − min_c of the 8-bit image."""
    q = torch.round(img.clamp(0, 1) * 255)
    return (q.amax(1) - q.amin(1)).flatten(1).amax(1).tolist()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    sets = dict(a.split("=", 1) for a in sys.argv[2:])
    x_np, _, idx = load_protocol_split("tuning", n)
    x = torch.round(torch.from_numpy(x_np) * 255) / 255  # as the exported PNGs
    clf = load_classifier("demo:digits", ClassifierOptions())
    params = resolve_params("eced", ECED.params, ECED.presets, {"preset": "digits", **sets})
    exp = ECED(ExplainContext(classifier=clf, params=params, model=None))
    probs = clf.predict_proba(x)
    src = probs.argmax(1)
    second = probs.clone()
    second[torch.arange(n), src] = -1
    batch = ExplainBatch(ids=[f"tuning-{i:04d}" for i in idx], images=x, targets=second.argmax(1), sources=src,
                         seeds=[1000 + k for k in range(n)], masks=None)

    rec: dict = {"z0": []}
    chain, background = core.blended_chain, core.preserve_background

    def recording_chain(*a, **k):
        z0 = chain(*a, **k)
        rec["z0"].append(z0.detach())
        return z0

    def recording_background(*a, **k):
        rec["bg"] = background(*a, **k)
        return rec["bg"]

    core.blended_chain, core.preserve_background = recording_chain, recording_background
    outs = exp.explain(batch)
    m = exp.model
    with torch.no_grad():
        z_f = m.encode_images(x.to(m.device))
        loaded = core.SharedDecoder(m.vae, m.scaling_factor)
        rows = torch.arange(n)

        def d(z):
            return (loaded(z) + 1) / 2

        def d_star(z):
            return (rec["bg"].decoders(z, rows) + 1) / 2

        z_bg, z0 = rec["bg"].z_bg, rec["z0"][0]
        table = [("input x", x), ("VAE round trip D(E(x))", d(z_f)), ("tuned copy D*(E(x))", d_star(z_f)),
                 ("D(z_bg*)", d(z_bg)), ("D*(z_bg*)", d_star(z_bg)), ("first chain z_0, D", d(z0)),
                 ("first chain z_0, D*", d_star(z0)),
                 ("output", torch.stack([o.counterfactual for o in outs]))]
        for name, img in table:
            s = spread(img)
            print(f"{name:24s} mean {sum(s) / n:5.1f} max {max(s):3.0f}  {[int(v) for v in s]}")
    print("flipped at", [o.params["flipped_at_iteration"] for o in outs])


if __name__ == "__main__":
    main()
