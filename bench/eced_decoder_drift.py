"""Does Alg. 2's tuned decoder copy still decode the key region faithfully? (ECED on the embedded demo)

    OMP_NUM_THREADS=1 python bench/eced_decoder_drift.py [--n 40] [--rates 1e-3,1e-4,0]

For the first N tuning digits: the key region M of the digits preset (ScoreCAM of the predicted label, ξ), Alg. 2
(N = 100 iterations, z^bg rate 0.01) at each decoder learning rate, then a latent that Alg. 3 could produce — the
latent of *another* digit (a random training digit of another class) inside M', the tuned z^bg outside — decoded
by the tuned copy D* and by the loaded decoder D. Printed per rate: Alg. 2's background loss (median, first and
last iteration) and the ℓ1 inside M between each decoding and the other digit. A copy that decodes the other
digit worse than D has drifted in the key region, where eq. 12 does not constrain it (docs/methods/eced.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.demo.data import load_protocol_split, load_split
from cfx_cli.diffusion.noise import SeededNoise
from cfx_cli.explainers import ExplainContext
from cfx_cli.params import resolve_params
from cfx_plugins.explainers.eced import ECED
from cfx_plugins.explainers.eced.core import preserve_background


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="the first N tuning digits")
    ap.add_argument("--rates", default="1e-3,1e-4,0", help="decoder learning rates of Alg. 2")
    ap.add_argument("--xi", type=float, default=ECED.presets["digits"]["xi"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # ECED itself (digits preset, demo:latent) computes M and M', so the regions are the method's
    params = resolve_params("eced", ECED.params, ECED.presets, {"preset": "digits", "xi": args.xi})
    eced = ECED(ExplainContext(classifier=load_classifier("demo:digits", ClassifierOptions()), params=params))
    model = eced.model
    x, y, _ = load_protocol_split("tuning", args.n)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(np.asarray(y))
    pix, _ = eced.key_region(x, y)
    with torch.no_grad():
        z_f = model.encode_images(x)
    lat = eced.latent_mask(pix, z_f.shape[-2:])
    x_tr, y_tr, _, _ = load_split()
    rng = np.random.default_rng(0)
    other = torch.from_numpy(np.stack([x_tr[rng.choice(np.flatnonzero(y_tr != k))] for k in y.tolist()])).float()
    with torch.no_grad():
        z_other = model.encode_images(other)
    region = pix.bool().expand_as(x)
    print(f"ECED Alg. 2 decoder drift: {len(x)} tuning digits, ξ = {args.xi}, region area {float(pix.mean()):.2f}")
    heads = ("decoder lr", "bg loss first", "bg loss last", "ℓ1 in M, D*", "ℓ1 in M, D", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (10, 14, 13, 12, 11, 6), strict=True)))
    for rate in (float(r) for r in args.rates.split(",")):
        draws = SeededNoise().for_batch([f"d{i}" for i in range(len(x))], list(range(len(x))), "cpu")
        bg = preserve_background(model.vae, model.scaling_factor, x, z_f, lat, pix, float(model.alphas_cumprod[0]),
                                 100, 0.01, rate, draws)
        with torch.no_grad():
            z = z_other * lat + bg.z_bg * (1 - lat)
            tuned = ((bg.decoders(z, torch.arange(len(x))) + 1) / 2).clamp(0, 1)
            plain = ((model.vae.decode(z / model.scaling_factor).sample + 1) / 2).clamp(0, 1)
        l1_tuned = float((tuned - other).abs()[region].mean())
        l1_plain = float((plain - other).abs()[region].mean())
        print(f"{rate:>10g} {np.median(bg.loss_first):>14.6f} {np.median(bg.loss_last):>13.6f} {l1_tuned:>12.3f} "
              f"{l1_plain:>11.3f} {l1_tuned / l1_plain:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
