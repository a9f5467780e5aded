"""``demo:digits``: the embedded digits classifier (white-box, 3×16×16 inputs); ``demo:hit-digits``: a HiT on the same
digits (:mod:`cfx_plugins.classifiers.hit`); ``demo:oracle-mlp`` / ``demo:oracle-rff``: the independent judges of the
demo's realism metrics (:mod:`cfx_cli.demo.judges`), usable as classifiers too; ``demo:digits-robust``: the demo CNN
adversarially trained, the guide of robust-classifier guidance (``--set guide=demo:digits-robust``,
cfx_cli/guide.py)."""

from __future__ import annotations

from cfx_cli.classifiers import Classifier, ClassifierAdapter, ClassifierOptions
from cfx_cli.demo import LABELS, RESOLUTION
from cfx_cli.errors import UsageError
from cfx_cli.hookspecs import hookimpl
from cfx_plugins.classifiers.hit import load_demo as load_hit_demo

MODELS = ("digits", "digits-robust", "hit-digits", "oracle-mlp", "oracle-rff")


class DemoAdapter(ClassifierAdapter):
    name = "demo"
    schemes = ("demo",)
    summary = ("embedded demo classifiers: demo:digits (CNN on scikit-learn digits, 16×16), demo:digits-robust (the "
               "same CNN adversarially trained: a guide for --set guide=), demo:hit-digits (HiT, "
               "the Hindered Transformer, on the same digits), demo:oracle-mlp and demo:oracle-rff (the demo metrics' "
               "independent judges: an MLP and a random-feature kernel machine)")
    capabilities = frozenset({"probabilities", "gradients"})

    def load(self, spec: str, options: ClassifierOptions) -> Classifier:
        name = spec.split(":", 1)[1]
        if name not in MODELS:
            raise UsageError(f"unknown demo classifier {spec!r} (available: {', '.join('demo:' + m for m in MODELS)})")
        if name == "hit-digits":
            return load_hit_demo(spec, options)
        from cfx_cli.demo.classifier import ROBUST_WEIGHTS, load_pretrained
        from cfx_cli.demo.judges import load_judge
        from cfx_cli.whitebox import TorchModuleClassifier

        if name == "digits":
            net = load_pretrained(options.device)
        elif name == "digits-robust":
            net = load_pretrained(options.device, ROBUST_WEIGHTS)
        else:
            net = load_judge(name, options.device)
        return TorchModuleClassifier(net, LABELS, (RESOLUTION, RESOLUTION), spec=spec, device=options.device)


@hookimpl
def register_classifier_adapters(register):
    register(DemoAdapter)
