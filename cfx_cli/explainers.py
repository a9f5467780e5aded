"""The explainer protocol: a batch of images with per-image targets in, counterfactuals out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cfx_cli.params import Param

if TYPE_CHECKING:
    import torch

    from cfx_cli.classifiers import Classifier
    from cfx_cli.diffusion.noise import NoiseSource


def default_noise() -> NoiseSource:
    """The seeded per-image source (``cfx_cli.diffusion.noise.SeededNoise``); imported here, not at the top,
    because ``cfx_cli.diffusion`` imports torch and this module is read by ``cfx --help``."""
    from cfx_cli.diffusion.noise import SeededNoise

    return SeededNoise()


@dataclass(frozen=True)
class RunOptions:
    """Run-wide options of ``cfx explain`` besides the method's own ``--set`` parameters."""

    #: forward-only generative-network calls (``--backend``, ``--precision``, ``--channels-last``, ``--compile``);
    #: only methods with ``uses_backend = True`` honour them (see :func:`cfx_cli.backends.forward_backend`);
    #: ``--precision``, ``--channels-last`` and ``--compile`` also apply to differentiated calls where the method
    #: lists them in ``gradient_options`` (:mod:`cfx_cli.backends.grad`)
    backend: str = "auto"
    backend_precision: str = "fp32"
    channels_last: bool = False
    compile: bool | str = False  # True or a torch.compile mode such as "reduce-overhead"
    #: ``CFX_DEBUG=1``: an explainer's exception propagates (with its traceback) instead of error records
    debug: bool = False

    def requested(self) -> list[str]:
        """The options asked for besides the defaults, as named in ``Explainer.gradient_options`` (plus
        ``backend``, which only forward-only calls honour)."""
        asked = {"backend": self.backend != "auto", "precision": self.backend_precision != "fp32",
                 "channels_last": self.channels_last, "compile": bool(self.compile)}
        return [name for name, on in asked.items() if on]

    def backend_summary(self) -> dict[str, Any]:
        """What run.json records under ``backend`` (what was asked for)."""
        return {"backend": self.backend, "backend_precision": self.backend_precision,
                "channels_last": self.channels_last, "compile": self.compile}


@dataclass
class ExplainContext:
    """Everything an explainer may need besides the batch; built once per run."""

    classifier: Classifier
    params: dict[str, Any]  # resolved hyperparameters (defaults < preset < --set), method options included
    device: str = "cpu"
    model: str | None = None  # --model SPEC (generative prior), None = method's demo default
    model_flags: str | None = None
    trust_pickle: bool = False
    options: RunOptions = field(default_factory=RunOptions)
    #: every random draw of the explainer goes through it (docs/plugins.md "Noise"); tests substitute one
    noise: NoiseSource = field(default_factory=default_noise)


@dataclass
class ExplainBatch:
    """The inputs at the explainer's :meth:`~Explainer.working_size` (its generator's resolution): float32
    (N, 3, H, W) in [0, 1] on ``context.device``, quantised as the saved originals. The classifier takes them at
    this size and applies its own preprocessing (its declared input size, mean/std)."""

    ids: list[str]  # the inputs' run ids (file names in the run directory)
    images: torch.Tensor  # float32 (N, 3, H, W) in [0, 1] on context.device, (H, W) = the working size
    targets: torch.Tensor  # (N,) int64 class indices on context.device (index into classifier.labels)
    sources: torch.Tensor  # (N,) int64 predicted class of each input, on context.device
    seeds: list[int]  # one per image, derived from --seed and the input id (batching-independent)
    masks: torch.Tensor | None = None  # (N, 1, H, W) in {0, 1}: where changes are allowed


@dataclass
class ExplainOutput:
    """One counterfactual. ``extras`` maps a folder name (e.g. ``pre_explanations``) to an image."""

    #: (3, H, W) in [0, 1] at the batch's H, W (the working size); any float dtype, any device (cfx detaches it,
    #: moves it to the CPU, clamps it to [0, 1] and saves it as an 8-bit PNG; the re-classification sees exactly
    #: that PNG)
    counterfactual: torch.Tensor
    mask: torch.Tensor | None = None  # (1, H, W) region that was allowed to change; any device
    params: dict[str, Any] = field(default_factory=dict)  # the attempt that produced it
    nfe: int = 0  # network evaluations (generative model + classifier) spent on this image
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Explainer:
    """Base class of every explainer. Subclasses set the class attributes and implement ``explain``.

    These class attributes are the whole contract between cfx and an explainer: cfx reads no other attribute
    of an explainer class (a test checks it), and docs/plugins.md documents each of them.
    Keep module-level imports light; import torch and model code inside ``__init__``/``explain``.
    """

    #: the method name (``--method NAME``), unique across the installed plugins
    name: ClassVar[str]
    #: one line for ``cfx methods``
    summary: ClassVar[str] = ""
    #: a longer description for ``cfx methods NAME`` (paper, algorithm summary, choices made)
    description: ClassVar[str] = ""
    #: classifier capabilities needed, e.g. ``frozenset({"gradients"})``; empty = works black-box
    requires: ClassVar[frozenset[str]] = frozenset()
    #: the hyperparameters ``--set KEY=VALUE`` accepts, also method options such as TIME's ``tokens``
    params: ClassVar[tuple[Param, ...]] = ()
    #: named sets of hyperparameters (``--set preset=NAME``), e.g. the papers' per-dataset settings
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: preset applied automatically for a classifier spec (e.g. ``{"demo:digits": "digits"}``) when the
    #: user chose none; the CLI says so, and run.json records it
    auto_presets: ClassVar[dict[str, str]] = {}
    #: does the method honour a region (``--region``/``--mask``)? Otherwise a region is a usage error.
    uses_region: ClassVar[bool] = False
    #: the ``--region`` spec used when the user gives none (e.g. ``"auto"``); None = no region
    default_region: ClassVar[str | None] = None
    #: per preset, the ``--set region_*`` options it implies for the region source (those the source reads);
    #: explicit ``--set region_*`` values win
    region_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: does the method run forward-only network calls through ``cfx_cli.backends`` (``--backend``,
    #: ``--precision``, ``--channels-last``, ``--compile``)? Otherwise only the options in ``gradient_options``
    #: apply, and the others are a usage error.
    uses_backend: ClassVar[bool] = False
    #: the run options its *differentiated* network calls (those it takes gradients through) honour, from
    #: ``{"precision", "channels_last", "compile"}``: ``precision`` = they run under ``--precision fp16|bf16`` with
    #: ``torch.autocast`` (:func:`cfx_cli.backends.grad.grad_precision`); ``channels_last``/``compile`` = the
    #: generative network it differentiates goes through :func:`cfx_cli.backends.grad.grad_network`. An option that
    #: neither this nor ``uses_backend`` covers is a usage error.
    gradient_options: ClassVar[frozenset[str]] = frozenset()
    #: set by ``__init__``: the run's classifier, device, model spec and options (the resolved parameters are
    #: also ``self.params``, a dict, on the instance)
    context: ExplainContext

    def __init__(self, context: ExplainContext) -> None:
        """Load models here (once per run), not at import. On the instance, ``self.params`` is the dict of resolved
        values by name (defaults < preset < ``--set``), while the class attribute ``params`` stays the tuple of
        :class:`Param` declarations (``type(self).params``)."""
        self.context = context
        self.params: dict[str, Any] = context.params

    @classmethod
    def auto_preset(cls, classifier_spec: str, model: str | None, settings: dict[str, Any]) -> tuple[str, str] | None:
        """The preset to apply when the user chose none, and why (cfx prints ``note: using M preset P WHY``); None
        = none. ``settings`` are the ``--set`` values the user gave this method (unparsed; e.g. TIME's
        ``tokens``). Called before any work, so read only light things (a JSON sidecar, never a model). The
        default looks the classifier spec up in ``auto_presets``."""
        preset = cls.auto_presets.get(classifier_spec)
        return (preset, f"for classifier {classifier_spec}") if preset else None

    def run_info(self) -> dict[str, Any]:
        """Facts about this run for ``run.json`` (its ``method_info``): e.g. the artifact files the method read and
        their hashes. Called once after ``__init__``; {} = nothing to add."""
        return {}

    def working_size(self) -> tuple[int, int] | None:
        """(H, W) the method works at: cfx brings every input from its native resolution to it (short-side resize
        + centre crop, :func:`cfx_cli.images.fit_to_size`) before ``explain``, and the originals and
        counterfactuals are saved at it. Methods with a generator return the generator's own image size; None =
        each input at its native size. Called once after ``__init__``. The default: the classifier's declared
        input size (None when it declares none)."""
        return self.context.classifier.input_size

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        """One :class:`ExplainOutput` per image of ``batch``, in order. Raise ``InputError``/``ClassifierError``
        for a problem with the inputs or the classifier: the batch gets ``error`` records and the run goes on."""
        raise NotImplementedError
