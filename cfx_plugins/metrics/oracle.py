"""MNAC and CD with an attribute oracle (DiME §3.4; ACE's ``compute_MNAC.py`` / ``compute_CD.py``).

The oracle is any classifier spec (``--set oracle=SPEC`` or ``CFX_ORACLE``) whose outputs are read as
attribute probabilities: ``predict_proba`` by default, or the sigmoid of its logits with
``--set oracle_activation=sigmoid`` for a multi-label oracle such as CelebA's 40 attributes (white-box specs).
``oracle_attributes`` (comma list or a file, one per line) names its outputs; default: the oracle's labels.
An attribute is "on" when its probability exceeds 0.5. Both metrics use the successful counterfactuals.

- MNAC: mean number of attributes whose on/off state differs between original and counterfactual.
- CD (eq. 3.19): Σ_a |corr_cf(Δq, Δa) − corr_data(q, a)|, with Δ = on(cf) − on(original), q the query
  attribute (``--set oracle_query=NAME``: the attribute the explained classifier decides), corr_cf the
  Pearson correlation over the counterfactuals (0 where undefined, as ACE), corr_data the correlations in the
  data from ``--set correlations=FILE`` (``CFX_ORACLE_CORRELATIONS``): either JSON ``{attribute: corr}`` or a
  CSV table of per-image 0/1 (or ±1) annotations with a header row (e.g. CelebA's ``list_attr_celeba.csv``,
  restricted to the training partition as ACE does), from which the correlations are computed.
- oracle_flip_rate: the share of explained inputs whose counterfactual independent classifiers of the same
  labels (``--set flip_oracles=SPEC[,SPEC…]`` or ``CFX_FLIP_ORACLES``) assign to the target class: does a judge
  other than the explained classifier see the target? (an adversarial example fools only the one it attacked).

On a demo run (``cfx_plugins.nets.digits``) the oracles default to the demo's judges: ``demo:oracle-mlp`` for
MNAC/CD and both ``demo:oracle-mlp`` and ``demo:oracle-rff`` for the oracle flip rate. The output names them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cfx_cli.classifiers import ClassifierOptions, load_classifier
from cfx_cli.errors import CfxError, MetricUnavailable
from cfx_cli.hookspecs import hookimpl
from cfx_cli.metrics import Metric
from cfx_plugins.nets.digits import DEMO_ORACLES, describe, is_demo_run
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


def load_oracle(spec: str, device: str):
    try:
        return load_classifier(spec, ClassifierOptions(device=device))
    except CfxError as exc:
        raise MetricUnavailable(f"cannot load oracle {spec}: {exc}") from None


def probabilities(run, clf, relpaths: list[str], device: str, activation: str = "softmax") -> np.ndarray:
    """(N, K) probabilities of the oracle ``clf`` on the run's images (sigmoid of its logits or softmax)."""
    import torch

    from cfx_plugins.nets.features import rgb

    out = []
    with torch.no_grad():
        for start in range(0, len(relpaths), 32):
            imgs = np.stack([rgb(run.image(p)) for p in relpaths[start:start + 32]])
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().to(device)
            p = torch.sigmoid(clf.logits(x)) if activation == "sigmoid" else clf.predict_proba(x)
            out.append(p.detach().cpu().numpy())
    return np.concatenate(out)


class _Oracle:
    def __init__(self, run, context) -> None:
        spec = option(context, "oracle", "CFX_ORACLE") or (DEMO_ORACLES[0] if is_demo_run(run, context) else None)
        if not spec:
            raise MetricUnavailable(
                "needs an attribute oracle: --set oracle=SPEC (any classifier spec) or CFX_ORACLE")
        self.activation = str(option(context, "oracle_activation", "CFX_ORACLE_ACTIVATION", "softmax"))
        if self.activation not in ("softmax", "sigmoid"):
            raise MetricUnavailable(f"oracle_activation={self.activation!r}: expected softmax or sigmoid")
        self.spec = str(spec)
        self.clf = load_oracle(self.spec, context.device)
        names = option(context, "oracle_attributes", "CFX_ORACLE_ATTRIBUTES")
        if names:
            p = Path(str(names))
            lines = p.read_text(encoding="utf-8").splitlines() if p.is_file() else str(names).split(",")
            names = [x.strip() for x in lines if x.strip()]
        self.attributes = list(names) if names else list(self.clf.labels)
        self.device = context.device
        self.run = run

    def on(self, relpaths: list[str]) -> np.ndarray:
        probs = probabilities(self.run, self.clf, relpaths, self.device, self.activation)
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
    unranked = frozenset({"mnac_std", "mnac_oracle"})

    def compute(self, run, context):
        oracle = _Oracle(run, context)
        try:
            a, b = oracle.pairs()
        finally:
            oracle.close()
        counts = mnac(a, b)
        return {"mnac": float(counts.mean()), "mnac_std": float(counts.std()), "mnac_oracle": describe(oracle.spec)}


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


def column_suffix(spec: str, taken: set[str]) -> str:
    """A short column suffix for an oracle: ``demo:oracle-mlp`` → ``mlp``, ``./judge.pt`` → ``judge_pt``."""
    tail = spec.replace("\\", "/").rsplit("/", 1)[-1].split(":", 1)[-1].removeprefix("oracle-")
    base = "".join(c if c.isalnum() else "_" for c in tail.lower()).strip("_") or "oracle"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class OracleFlipRate(Metric):
    name = "oracle_flip_rate"
    summary = ("share of explained inputs whose counterfactual independent classifiers (oracles) assign to the "
               "target class; mean over the oracles and per oracle")
    needs = frozenset({"oracle classifiers with the run's labels"})
    default = False
    lower_is_better = False
    unranked = frozenset({"oracle_judges", "oracle_source_agreement"})

    def compute(self, run, context):
        raw = option(context, "flip_oracles", "CFX_FLIP_ORACLES")
        specs = ([s.strip() for s in str(raw).split(",") if s.strip()] if raw else
                 list(DEMO_ORACLES) if is_demo_run(run, context) else [])
        if not specs:
            raise MetricUnavailable("needs independent classifiers of the run's labels: --set flip_oracles=SPEC[,SPEC] "
                                    "or CFX_FLIP_ORACLES (demo runs use the demo's judges)")
        recs = run.explained(required=True)
        values: dict[str, float | str] = {}
        rates, agreements, taken = [], [], set()
        for spec in specs:
            clf = load_oracle(spec, context.device)
            try:
                labels = list(clf.labels)
                missing = sorted({r["target_label"] for r in recs} - set(labels))
                if missing:
                    raise MetricUnavailable(f"oracle {spec} has no class {missing[0]!r} (its labels: "
                                            f"{', '.join(labels[:10])})")
                seen_cf = probabilities(run, clf, [r["counterfactual"] for r in recs], context.device).argmax(1)
                seen_orig = probabilities(run, clf, [r["original"] for r in recs], context.device).argmax(1)
            finally:
                clf.close()
            rate = float(np.mean([labels[k] == r["target_label"] for k, r in zip(seen_cf, recs, strict=True)]))
            agreements.append(float(np.mean([labels[k] == r["source_label"]
                                             for k, r in zip(seen_orig, recs, strict=True)])))
            values[f"oracle_flip_rate_{column_suffix(spec, taken)}"] = rate
            rates.append(rate)
        # the share of originals the oracles assign to the explained classifier's class: do the judges read them?
        return {"oracle_flip_rate": float(np.mean(rates)), **values,
                "oracle_source_agreement": float(np.mean(agreements)),
                "oracle_judges": ", ".join(describe(s) for s in specs)}


@hookimpl
def register_metrics(register):
    register(MNAC)
    register(CD)
    register(OracleFlipRate)
