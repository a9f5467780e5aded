"""Embedding similarities between each original and its counterfactual.

- ``s3`` (S³, ACE): cosine similarity of SimSiam ResNet-50 embeddings (the projector output z), images
  normalized with ImageNet mean/std at their own size; over every explained input (ACE's script: the
  correctly classified inputs, successful or not). Weights: ``checkpoint_0099.pth.tar``
  (``--set simsiam_weights=PATH`` or ``CFX_SIMSIAM_WEIGHTS``).
- ``fva`` (FS and FVA, DiME): cosine similarity of VGGFace2 ResNet-50 pooled features (images resized to
  224, BGR, 0–255 minus the VGGFace2 channel means), over the successful counterfactuals; FVA is the share
  with FS > 0.5. Weights: ``resnet50_ft_weight.pkl`` (``--set vggface2_weights=PATH`` or
  ``CFX_VGGFACE2_WEIGHTS``); the pickle is read with an unpickler that accepts numpy arrays only.

On a demo run (``cfx_plugins.nets.digits``) without SimSiam weights named, ``s3`` uses the demo's feature network
(``demo:features``, the network of the demo FID; no download); ``s3_network`` names the network either way.
``fva`` does not apply to demo runs (digits have no faces) and is skipped there unless VGGFace2 weights are named.
"""

from __future__ import annotations

import functools

import numpy as np

from cfx_cli.classifiers import IMAGENET_MEAN, IMAGENET_STD
from cfx_cli.demo import RESOLUTION
from cfx_cli.errors import MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_plugins.nets.digits import demo_features, is_demo_run
from cfx_plugins.nets.weights import WeightsSpec, int_option, option, resolve

VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (torch's CosineSimilarity: norms clamped at 1e-8)."""
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-8)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-8)
    return (a * b).sum(axis=1) / (na * nb)


def _pair_features(run, context, recs, cache_name, compute, size, antialias=False):
    from cfx_plugins.nets.features import cached_features

    batch = int_option(context, "batch_size", "CFX_EVAL_BATCH_SIZE", 16)
    kw = dict(size=size, batch_size=batch, device=context.device, antialias=antialias)
    a = cached_features(run, [r["original"] for r in recs], cache_name, compute, **kw)
    b = cached_features(run, [r["counterfactual"] for r in recs], cache_name, compute, **kw)
    return a, b


class S3(Metric):
    name = "s3"
    summary = "S³: cosine similarity of SimSiam ResNet-50 embeddings, original vs counterfactual"
    needs = frozenset({"simsiam weights (demo runs: none)"})
    default = False
    lower_is_better = False
    unranked = frozenset({"s3_network"})

    def compute(self, run, context):
        import torch

        from cfx_plugins.nets.features import weights_tag
        from cfx_plugins.nets.resnet import SIMSIAM_FILE, SIMSIAM_URL, load_simsiam

        recs = run.explained(required=True)
        if is_demo_run(run, context) and not option(context, "simsiam_weights", "CFX_SIMSIAM_WEIGHTS"):
            compute, name, about = demo_features()
            a, b = _pair_features(run, context, recs, name, compute, (RESOLUTION, RESOLUTION))
            return {"s3": float(cosine(a, b).mean()), "s3_network": about}
        path = resolve(context, WeightsSpec("simsiam_weights", "CFX_SIMSIAM_WEIGHTS", SIMSIAM_FILE,
                                            SIMSIAM_URL))
        net = functools.cache(lambda: load_simsiam(path).to(context.device))  # not loaded when all is cached
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

        def compute(x):
            return net()((x - mean.to(x.device)) / std.to(x.device))

        a, b = _pair_features(run, context, recs, f"simsiam-{weights_tag(path)}", compute, None)
        return {"s3": float(cosine(a, b).mean()), "s3_network": f"simsiam ({path.name})"}


class FaceVerification(Metric):
    name = "fva"
    summary = "FS: VGGFace2 ResNet-50 cosine similarity, successful counterfactuals; FVA: share with FS > 0.5"
    needs = frozenset({"vggface2 weights"})
    default = False
    lower_is_better = False

    def compute(self, run, context):
        import torch

        from cfx_plugins.nets.features import weights_tag
        from cfx_plugins.nets.resnet import VGGFACE2_FILE, VGGFACE2_URL, load_vggface2

        if is_demo_run(run, context) and not option(context, "vggface2_weights", "CFX_VGGFACE2_WEIGHTS"):
            raise MetricUnavailable("face verification does not apply to the demo digits (no faces)")
        recs = [r for r in run.explained() if r["status"] == "flipped"]
        if not recs:
            raise MetricUnavailable("no successful counterfactuals in the run")
        path = resolve(context, WeightsSpec("vggface2_weights", "CFX_VGGFACE2_WEIGHTS", VGGFACE2_FILE,
                                            VGGFACE2_URL))
        net = functools.cache(lambda: load_vggface2(path).to(context.device))
        mean_bgr = torch.tensor(VGGFACE2_MEAN_BGR).view(1, 3, 1, 1)

        def compute(x):
            # the reference reads uint8 pixels; flip RGB → BGR and subtract the VGGFace2 means
            bgr = torch.round(x * 255).flip(1) - mean_bgr.to(x.device)
            return net().features(bgr)

        a, b = _pair_features(run, context, recs, f"vggface2-{weights_tag(path)}", compute, (224, 224),
                              antialias=True)  # PIL-like resize, as the reference
        fs = cosine(a, b)
        return {"fs": float(fs.mean()), "fva": float((fs > 0.5).mean())}


@hookimpl
def register_metrics(register):
    register(S3)
    register(FaceVerification)
