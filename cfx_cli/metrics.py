"""The metric protocol used by ``cfx eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from cfx_cli.classifiers import Classifier
    from cfx_cli.runs import RunData


@dataclass
class MetricContext:
    """What ``cfx eval`` can offer a metric; ``classifier`` is loaded lazily from the run's spec."""

    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    _classifier_loader: Any = None

    def classifier(self) -> Classifier:
        return self._classifier_loader()


class Metric:
    """Base class of every metric. ``compute`` returns ``{column: value}``; several columns are fine
    (e.g. ``sfid`` and ``sfid_std``). Raise :class:`cfx_cli.errors.MetricUnavailable` with a one-line
    reason when the run lacks what the metric needs; ``cfx eval`` then skips it and says why.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: e.g. ``{"classifier"}``, ``{"masks"}``, ``{"seeds"}``; informational, shown by ``cfx metrics``
    needs: ClassVar[frozenset[str]] = frozenset()
    #: included when ``--metrics`` is not given
    default: ClassVar[bool] = True
    #: smaller is better (shown in ``cfx metrics``; the report's arrow and best value)
    lower_is_better: ClassVar[bool | None] = None
    #: columns of ``compute``'s result that ``lower_is_better`` does not apply to: counts, spreads and
    #: descriptions of the inputs or the machine (e.g. ``{"fid_n"}``); they get no direction
    unranked: ClassVar[frozenset[str]] = frozenset()

    def compute(self, run: RunData, context: MetricContext) -> dict[str, float | int | None]:
        raise NotImplementedError
