"""The embedded demo's metric networks as the defaults of the realism metrics on demo runs.

A run "used the demo" when its classifier spec (``cfx eval --set classifier=SPEC`` first, then run.json) is a
``demo:`` spec: its inputs are the 16×16 digits, so Inception, SimSiam or CelebA oracles would be the wrong
judges and the demo's own (``cfx_cli/demo/judges.py``, trained on the demo training split) are used with no
download. Every metric that uses one records which network judged (spec, file and SHA-256 prefix).
"""

from __future__ import annotations

import functools
import hashlib

from cfx_cli.demo import JUDGES_DIR

DEMO_ORACLES = ("demo:oracle-mlp", "demo:oracle-rff")


def run_classifier_spec(run, context) -> str | None:
    return (context.options or {}).get("classifier") or (run.info.get("classifier") or {}).get("spec")


def is_demo_run(run, context) -> bool:
    return str(run_classifier_spec(run, context) or "").startswith("demo:")


@functools.cache
def _sha256(name: str) -> str:
    return hashlib.sha256((JUDGES_DIR / f"{name}.safetensors").read_bytes()).hexdigest()


def judge_name(spec: str) -> str:
    """``demo:oracle-mlp`` → ``oracle-mlp`` for a demo judge, else ''."""
    name = spec.split(":", 1)[1] if spec.startswith("demo:") else ""
    return name if (JUDGES_DIR / f"{name}.safetensors").is_file() else ""


def describe(spec: str) -> str:
    """What the eval output records about a judge: its spec, and for a demo judge its weights' hash."""
    name = judge_name(spec)
    return f"{spec} (judges/{name}.safetensors sha256:{_sha256(name)[:12]})" if name else spec


def demo_features():
    """(network computing (B, 3, 16, 16) → (B, 128) pooled features, cache name, description)."""
    from cfx_cli.demo.judges import load_judge

    net = functools.cache(load_judge)
    sha = _sha256("features")[:16]
    return (lambda x: net("features", str(x.device)).features(x), f"demo-features-{sha}",
            f"demo:features (judges/features.safetensors sha256:{sha[:12]})")
