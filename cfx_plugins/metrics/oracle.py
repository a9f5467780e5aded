"""MNAC and CD with an attribute oracle (DiME §3.4; ACE's ``compute_MNAC.py`` / ``compute_CD.py``).

The oracle is any classifier spec (``--set oracle=SPEC`` or ``CFX_ORACLE``) whose outputs are read as
attribute probabilities: ``predict_proba`` by default; the sigmoid of its raw outputs (``Classifier.scores``: the
PyTorch adapters and ONNX) with ``--set oracle_activation=sigmoid`` for a multi-label oracle such as CelebA's 40
attributes, all of which are compared, as the papers do; or one attribute, σ(l), for a spec with ``#attribute=K``
or ``#binary=1`` (:class:`cfx_cli.classifiers.SigmoidClassifier`). ``oracle_attributes`` (comma list or a file, one
per line) names its outputs (and resolves ``#attribute=NAME``); default: the oracle's labels. An attribute is "on"
when its probability exceeds 0.5. Both metrics use the successful counterfactuals.

- MNAC: mean number of attributes whose on/off state differs between original and counterfactual.
- CD (eq. 3.19): Σ_a |corr_cf(Δq, Δa) − corr_data(q, a)|, with Δ = on(cf) − on(original), q the query
  attribute (``--set oracle_query=NAME``: the attribute the explained classifier decides), corr_cf the
  Pearson correlation over the counterfactuals (0 where undefined, as ACE), corr_data the correlations in the
  data from ``--set correlations=FILE`` (``CFX_ORACLE_CORRELATIONS``): either JSON ``{attribute: corr}`` or a
  CSV table of per-image 0/1 (or ±1) annotations with a header row (e.g. CelebA's ``list_attr_celeba.csv``,
  restricted to the training partition as ACE does), from which the correlations are computed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cfx_cli.classifiers import Classifier, ClassifierOptions, SigmoidClassifier, load_classifier
from cfx_cli.errors import CfxError, MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_cli.spec_options import OUTPUT_OPTIONS, split_options
from cfx_plugins.nets.weights import option


def mnac(orig_on: np.ndarray, cf_on: np.ndarray) -> np.ndarray:
    return (orig_on != cf_on).sum(axis=1)


def pearson_or_zero(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def correlation_difference(orig_on: np.ndarray, cf_on: np.ndarray, query: int,
                           data_corr: np.ndarray) -> tuple[float, np.ndarray]:
    """CD and the per-attribute correlations of the changes (ACE's ``diff=True`` variant)."""
    deltas = cf_on.astype(float) - orig_on.astype(float)
    ours = np.array([pearson_or_zero(deltas[:, a], deltas[:, query]) for a in range(deltas.shape[1])])
    return float(np.abs(ours - data_corr).sum()), ours


def read_correlations(path: Path, attributes: list[str], query: str) -> np.ndarray:
    """Correlations of ``query`` with each attribute in the data, from a JSON mapping or an annotation CSV."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricUnavailable(f"correlations file {path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetricUnavailable(f"correlations file {path}: invalid JSON ({exc})") from None
        missing = [a for a in attributes if a not in mapping]
        if missing:
            raise MetricUnavailable(f"correlations file {path}: no value for {', '.join(missing[:5])}")
        return np.array([float(mapping[a]) for a in attributes])
    rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
    if len(rows) < 3:
        raise MetricUnavailable(f"correlations file {path}: expected a header and at least two rows")
    header = [h.strip() for h in rows[0]]
    missing = [a for a in attributes if a not in header]
    if missing:
        raise MetricUnavailable(f"correlations file {path}: no column for {', '.join(missing[:5])}")
    cols = [header.index(a) for a in attributes]
    try:
        table = np.array([[float(r[c]) for c in cols] for r in rows[1:]])
    except (ValueError, IndexError) as exc:
        raise MetricUnavailable(f"correlations file {path}: non-numeric annotation ({exc})") from None
    table[table < 0] = 0  # CelebA's -1 means "absent"
    q = table[:, attributes.index(query)]
    return np.array([pearson_or_zero(q, table[:, i]) for i in range(len(attributes))])


class _Oracle:
    def __init__(self, run, context) -> None:
        spec = option(context, "oracle", "CFX_ORACLE")
        if not spec:
            raise MetricUnavailable(
                "needs an attribute oracle: --set oracle=SPEC (any classifier spec) or CFX_ORACLE")
        self.activation = str(option(context, "oracle_activation", "CFX_ORACLE_ACTIVATION", "softmax"))
        if self.activation not in ("softmax", "sigmoid"):
            raise MetricUnavailable(f"oracle_activation={self.activation!r}: expected softmax or sigmoid")
        names = option(context, "oracle_attributes", "CFX_ORACLE_ATTRIBUTES")
        if names:
            p = Path(str(names))
            lines = p.read_text(encoding="utf-8").splitlines() if p.is_file() else str(names).split(",")
            names = [x.strip() for x in lines if x.strip()]
        # with #attribute=NAME / #binary=1 the names are the model's outputs, which resolve NAME
        picks_one = bool(set(split_options(str(spec))[1]) & {o.name for o in OUTPUT_OPTIONS})
        try:
            self.clf = load_classifier(spec, ClassifierOptions(device=context.device,
                                                               labels=list(names) if names and picks_one else None))
        except CfxError as exc:
            raise MetricUnavailable(f"cannot load oracle {spec}: {exc}") from None
        if isinstance(self.clf, SigmoidClassifier):
            self.attributes = [self.clf.labels[1]]  # one attribute: σ(l)
        else:
            self.attributes = list(names) if names else list(self.clf.labels)
            if self.activation == "sigmoid" and type(self.clf).scores is Classifier.scores:
                self.clf.close()
                raise MetricUnavailable(f"oracle_activation=sigmoid needs the raw outputs of the oracle {spec}, "
                                        "which its adapter does not give (use a PyTorch or ONNX spec)")
        self.device = context.device
        self.run = run

    def on(self, relpaths: list[str]) -> np.ndarray:
        import torch

        from cfx_plugins.nets.features import rgb

        out = []
        with torch.no_grad():
            for start in range(0, len(relpaths), 32):
                imgs = np.stack([rgb(self.run.image(p)) for p in relpaths[start:start + 32]])
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().to(self.device)
                if isinstance(self.clf, SigmoidClassifier):
                    p = self.clf.predict_proba(x)[:, 1:]
                elif self.activation == "sigmoid":
                    p = torch.sigmoid(self.clf.scores(x))
                else:
                    p = self.clf.predict_proba(x)
                out.append(p.detach().cpu().numpy())
        probs = np.concatenate(out)
        if probs.shape[1] != len(self.attributes):
            raise MetricUnavailable(f"oracle gives {probs.shape[1]} outputs but {len(self.attributes)} "
                                    "attribute names were given")
        return probs > 0.5

    def pairs(self):
        recs = [r for r in self.run.explained() if r["status"] == "flipped"]
        if not recs:
            raise MetricUnavailable("no successful counterfactuals in the run")
        return self.on([r["original"] for r in recs]), self.on([r["counterfactual"] for r in recs])

    def close(self) -> None:
        self.clf.close()


class MNAC(Metric):
    name = "mnac"
    summary = "mean number of oracle attributes changed by the successful counterfactuals"
    needs = frozenset({"attribute oracle"})
    default = False
    lower_is_better = True
    unranked = frozenset({"mnac_std"})

    def compute(self, run, context):
        oracle = _Oracle(run, context)
        try:
            a, b = oracle.pairs()
        finally:
            oracle.close()
        counts = mnac(a, b)
        return {"mnac": float(counts.mean()), "mnac_std": float(counts.std())}


class CD(Metric):
    name = "cd"
    summary = "correlation difference: Σ_a |corr(Δquery, Δa) on counterfactuals − corr(query, a) in data|"
    needs = frozenset({"attribute oracle", "correlations file"})
    default = False
    lower_is_better = True

    def compute(self, run, context):
        query = option(context, "oracle_query", "CFX_ORACLE_QUERY")
        corr_file = option(context, "correlations", "CFX_ORACLE_CORRELATIONS")
        if not query:
            raise MetricUnavailable("needs the query attribute: --set oracle_query=NAME or CFX_ORACLE_QUERY")
        if not corr_file:
            raise MetricUnavailable("needs the data's attribute correlations: --set correlations=FILE "
                                    "(JSON or annotation CSV) or CFX_ORACLE_CORRELATIONS")
        oracle = _Oracle(run, context)
        try:
            if str(query) not in oracle.attributes:
                raise MetricUnavailable(f"query attribute {query!r} is not one of the oracle's attributes "
                                        f"({', '.join(oracle.attributes[:10])}...)")
            data_corr = read_correlations(Path(str(corr_file)), oracle.attributes, str(query))
            a, b = oracle.pairs()
        finally:
            oracle.close()
        cd, _ = correlation_difference(a, b, oracle.attributes.index(str(query)), data_corr)
        return {"cd": cd}


@hookimpl
def register_metrics(register):
    register(MNAC)
    register(CD)
