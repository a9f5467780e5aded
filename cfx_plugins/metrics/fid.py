"""FID and sFID on FID-Inception pool3 features (2048-d), between the originals of the explained inputs and
the successful (flipped) counterfactuals, as ACE/DiME's ``compute_FID.sh`` / ``compute_sFID.sh`` do.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's port of TensorFlow's FID graph), given by
``cfx eval --set inception_weights=PATH`` or ``CFX_INCEPTION_WEIGHTS``. On a demo run (``cfx_plugins.nets.digits``)
the feature network defaults to the demo's own (``demo:features``, 128-d pooled features of a small ResNet trained
on the demo training split; no download) unless Inception weights are named; ``--set fid_network=inception|demo``
chooses explicitly. The output
names the network (``fid_network`` / ``sfid_network``). Features are cached per run in ``RUN_DIR/.cache/``.
"""

from __future__ import annotations

import numpy as np

from cfx_cli.demo import RESOLUTION
from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_plugins.nets.digits import demo_features, is_demo_run
from cfx_plugins.nets.weights import WeightsSpec, int_option, option, resolve

NETWORKS = ("inception", "demo")


def _spec():
    from cfx_plugins.nets.inception import WEIGHTS_FILE, WEIGHTS_URL

    return WeightsSpec("inception_weights", "CFX_INCEPTION_WEIGHTS", WEIGHTS_FILE, WEIGHTS_URL)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (rows are samples), as pytorch-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    tr (Σ1 Σ2)^½ = Σ √λ_i(Σ1^½ Σ2 Σ1^½): the symmetric form has the same eigenvalues as Σ1 Σ2, real and
    non-negative for PSD inputs, so no complex matrix square root (and no scipy) is needed; tiny negative
    eigenvalues from round-off are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two feature sets (rows are samples), exactly as from their unbiased Gaussian statistics.

    With centred samples A (n1×D) and B (n2×D), Σ1 Σ2 = AᵀA BᵀB / c, c = (n1−1)(n2−1), whose non-zero
    eigenvalues are those of (ABᵀ)(ABᵀ)ᵀ / c; so tr (Σ1 Σ2)^½ is the nuclear norm of ABᵀ / √c. When there are
    fewer samples than dimensions (the usual case for counterfactual sets against 2048-d features) that is an
    n1×n2 SVD instead of two D×D eigendecompositions; otherwise the covariance form is used.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    n1, n2 = len(real), len(fake)
    if n1 < 2 or n2 < 2:
        raise ValueError("FID needs at least two images on each side")
    d = real.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    a, b = real - mu1, fake - mu2
    c = (n1 - 1) * (n2 - 1)
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt(c)
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * tr_covmean)


def sfid_from_features(real: np.ndarray, fake: np.ndarray, flipped: np.ndarray, splits: int,
                       seed: int = 0) -> list[float]:
    """ACE's split protocol, repeated ``splits`` times: shuffle all N inputs, halves A (first ⌊N/2⌋) and B
    (last ⌊N/2⌋); average FID(originals of A, successful counterfactuals of B) and FID(originals of B,
    successful counterfactuals of A). ``real``/``fake`` are row-aligned per input; ``flipped`` marks the
    inputs whose counterfactual succeeded."""
    n = len(real)
    half = n // 2
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = perm[:half], perm[n - half:]
        fa, fb = a[flipped[a]], b[flipped[b]]
        if min(len(a), len(b), len(fa), len(fb)) < 2:
            raise ValueError("each half needs at least two originals and two successful counterfactuals")
        values.append(0.5 * (fid_from_features(real[a], fake[fb]) + fid_from_features(real[b], fake[fa])))
    return values


def _inception(context):
    """(compute, cache name, input size, description) of FID-Inception pool3."""
    from cfx_plugins.nets.features import weights_tag

    path = resolve(context, _spec())
    net_holder: dict = {}

    def compute(x):
        if "net" not in net_holder:
            from cfx_plugins.nets.inception import load

            net_holder["net"] = load(path).to(context.device)
        return net_holder["net"](x)

    return compute, f"fid-inception-{weights_tag(path)}", (299, 299), f"inception ({path.name})"


class _FIDFeatures:
    """The feature network's features of the run's explained originals and counterfactuals (cached)."""

    def __init__(self, run, context) -> None:
        self.run, self.context = run, context

    def get(self):
        from cfx_plugins.nets.features import cached_features

        cache = self.run._cache  # shared by fid and sfid within one `cfx eval`
        key = "<fid-features>"
        if key in cache:
            return cache[key]
        # weights named by the user win; a demo run without them is judged by the demo's feature network
        named = option(self.context, _spec().key, _spec().env)
        default = "demo" if is_demo_run(self.run, self.context) and not named else "inception"
        network = str(option(self.context, "fid_network", "CFX_FID_NETWORK", default))
        if network not in NETWORKS:
            raise MetricUnavailable(f"fid_network={network!r}: expected {' or '.join(NETWORKS)}")
        recs = self.run.explained(required=True)
        if network == "demo":
            (compute, name, about), size = demo_features(), (RESOLUTION, RESOLUTION)
        else:
            compute, name, size, about = _inception(self.context)
        batch = int_option(self.context, "batch_size", "CFX_EVAL_BATCH_SIZE", 16)
        kw = dict(size=size, batch_size=batch, device=self.context.device)
        real = cached_features(self.run, [r["original"] for r in recs], name, compute, **kw)
        fake = cached_features(self.run, [r["counterfactual"] for r in recs], name, compute, **kw)
        flipped = np.array([r["status"] == "flipped" for r in recs])
        cache[key] = (real, fake, flipped, about)
        return cache[key]


class FID(Metric):
    name = "fid"
    summary = ("Fréchet Inception distance, all originals vs successful counterfactuals (pool3, 2048-d; "
               "demo runs: the demo feature network)")
    needs = frozenset({"inception weights (demo runs: none)"})
    default = False
    lower_is_better = True
    unranked = frozenset({"fid_n", "fid_network"})

    def compute(self, run, context):
        real, fake, flipped, about = _FIDFeatures(run, context).get()
        if flipped.sum() < 2 or len(real) < 2:
            raise MetricUnavailable(f"needs at least 2 originals and 2 successful counterfactuals "
                                    f"(has {len(real)} and {int(flipped.sum())})")
        return {"fid": fid_from_features(real, fake[flipped]), "fid_n": int(flipped.sum()), "fid_network": about}


class SFID(Metric):
    name = "sfid"
    summary = "split FID: originals of one half vs counterfactuals of the other, mean ± std over k splits"
    needs = frozenset({"inception weights (demo runs: none)"})
    default = False
    lower_is_better = True
    unranked = frozenset({"sfid_std", "sfid_splits", "sfid_network"})

    def compute(self, run, context):
        splits = int_option(context, "sfid_splits", "CFX_SFID_SPLITS", 10)
        seed = int_option(context, "sfid_seed", "CFX_SFID_SEED", 0, minimum=0)
        real, fake, flipped, about = _FIDFeatures(run, context).get()
        try:
            values = sfid_from_features(real, fake, flipped, splits, seed)
        except ValueError as exc:
            n_ok = int(flipped.sum())
            raise MetricUnavailable(f"{exc} (run has {len(real)} inputs, {n_ok} flipped)") from None
        return {"sfid": float(np.mean(values)),
                "sfid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "sfid_splits": len(values), "sfid_network": about}


@hookimpl
def register_metrics(register):
    register(FID)
    register(SFID)
