"""The plugin contract is explicit: cfx reads no explainer attribute that the ``Explainer`` base class does not
declare, and docs/plugins.md documents every hook and every declared attribute (datasette tests its hook docs
the same way)."""

from __future__ import annotations

import inspect
import re

import pytest
from conftest import REPO
from typer.testing import CliRunner

from cfx_cli import hookspecs, plugins
from cfx_cli.cli import app
from cfx_cli.explainers import Explainer
from cfx_cli.hookspecs import hookimpl
from cfx_cli.regions import RegionSource
from cfx_plugins.explainers.pgd import MaskedPGD

PLUGINS_DOC = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
READS: set[str] = set()


def declared(cls: type) -> set[str]:
    """What a base class declares: its annotated attributes and the public names it defines."""
    return set(inspect.get_annotations(cls)) | {n for n in vars(cls) if not n.startswith("_")}


class _Recorded:
    """An explainer instance as cfx sees it: every attribute cfx reads from outside the explainer is recorded."""

    def __init__(self, inner: Explainer) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str):
        READS.add(name)
        return getattr(object.__getattribute__(self, "_inner"), name)


class _Recording(type):
    """Records the attributes read on the class (the registry, the request, the worker, `cfx methods`)."""

    def __getattribute__(cls, name: str):
        if not name.startswith("__"):
            READS.add(name)
        return type.__getattribute__(cls, name)

    def __call__(cls, *args, **kwargs):
        return _Recorded(type.__call__(cls, *args, **kwargs))


class Probe(MaskedPGD, metaclass=_Recording):
    name = "contract_probe"


class ProbePlugin:
    @hookimpl
    def register_explainers(self, register):
        register(Probe)


@pytest.fixture
def probe():
    plugins.reset()
    plugins.register_plugin(ProbePlugin(), name="contract-probe")
    READS.clear()
    yield
    plugins.reset()


def test_cfx_reads_only_declared_explainer_attributes(probe, tmp_path, demo_images):
    runner = CliRunner()
    res = runner.invoke(app, ["methods", "contract_probe"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["explain", str(demo_images), "--method", "contract_probe", "--limit", "2",
                              "--set", "iterations=2", "--region", "auto", "--set", "region_steps=2",
                              "--set", "region_samples=1", "--precision", "bf16", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "manifest.jsonl").read_text().count("\n") == 2
    # the reads the pipeline is known to make were seen, so the recorder works
    assert {"params", "presets", "auto_presets", "requires", "uses_region", "default_region", "region_presets",
            "uses_backend", "gradient_options", "context", "explain", "description"} <= READS
    undeclared = READS - declared(Explainer)
    assert not undeclared, f"cfx reads explainer attributes the Explainer base does not declare: {undeclared}"
    Probe.not_in_the_contract = 1  # the check itself: a read of an undeclared attribute is seen
    assert Probe.not_in_the_contract and "not_in_the_contract" in READS - declared(Explainer)


def _documented(name: str) -> bool:
    return re.search(rf"`{re.escape(name)}\b", PLUGINS_DOC) is not None


def test_every_hook_is_documented():
    hooks = [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, f"{hookspecs.PROJECT}_spec")]
    assert {"register_explainers", "register_commands", "register_region_sources"} <= set(hooks)
    missing = [h for h in hooks if not _documented(h)]
    assert not missing, f"hooks not documented in docs/plugins.md: {missing}"


@pytest.mark.parametrize("base", [Explainer, RegionSource])
def test_every_declared_attribute_is_documented(base):
    names = sorted(declared(base))
    assert "default_region" in names or base is RegionSource
    missing = [n for n in names if not _documented(n)]
    assert not missing, f"{base.__name__} attributes not documented in docs/plugins.md: {missing}"
