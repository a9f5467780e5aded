"""Memory safety: a batch that runs out of GPU memory is split in halves and retried down to single images; an
image that does not fit alone fails its own record, never the run, and the split does not change any result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfx_cli import plugins
from cfx_cli.cli import app
from cfx_cli.devices import is_out_of_memory
from cfx_cli.explainers import ExplainBatch, Explainer, ExplainOutput
from cfx_cli.hookspecs import hookimpl

#: the batch size above which the fake device runs out of memory, and inputs that never fit
LIMIT = {"rows": 2, "never": set()}
CALLS: list[int] = []


class NoisyOOM(Explainer):
    """A third-party-style seeded explainer on a fake device with room for ``LIMIT["rows"]`` images."""

    name = "noisy_oom_test"
    summary = "adds per-image seeded noise; runs out of memory above a batch size"

    def explain(self, batch: ExplainBatch) -> list[ExplainOutput]:
        CALLS.append(len(batch.ids))
        if len(batch.ids) > LIMIT["rows"] or LIMIT["never"] & set(batch.ids):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        noise = self.context.noise.for_batch(batch.ids, batch.seeds, batch.images.device)
        z = noise.randn(range(len(batch.ids)), tuple(batch.images.shape[1:]), "z")
        cfs = (batch.images + 0.25 * z).clamp(0, 1)
        return [ExplainOutput(counterfactual=cf, nfe=1) for cf in cfs]


class Plugin:
    @hookimpl
    def register_explainers(self, register):
        register(NoisyOOM)


@pytest.fixture
def oom_plugin():
    plugins.reset()
    plugins.register_plugin(Plugin(), name="oom_test")
    LIMIT.update(rows=2, never=set())
    CALLS.clear()
    yield
    plugins.reset()


def _run(images: Path, out: Path, batch_size: int):
    return CliRunner().invoke(app, ["explain", str(images), "--method", "noisy_oom_test", "--out", str(out),
                                    "--batch-size", str(batch_size), "--limit", "8", "--device", "cpu"])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _cf_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "counterfactuals").glob("*.png"))}


def test_oom_splits_the_batch_and_changes_nothing(oom_plugin, demo_images, tmp_path):
    split = _run(demo_images, tmp_path / "split", batch_size=8)
    assert split.exit_code == 0, split.output
    assert "note: out of GPU memory on a batch of 8; retrying as 2 batches of 4" in split.output
    assert "retrying as 2 batches of 2" in split.output
    assert CALLS == [8, 4, 2, 2, 4, 2, 2]
    recs = _records(tmp_path / "split")
    ids = [r["id"] for r in recs]
    assert len(ids) == 8 and len(set(ids)) == 8  # every record exactly once
    assert all(r["status"] in ("flipped", "not_flipped", "skipped") for r in recs)

    LIMIT["rows"] = 8  # the same run on a device where the batch fits
    whole = _run(demo_images, tmp_path / "whole", batch_size=8)
    assert whole.exit_code == 0, whole.output
    assert "out of GPU memory" not in whole.output
    explained = _cf_bytes(tmp_path / "split")
    assert explained and explained == _cf_bytes(tmp_path / "whole")


def test_an_image_that_never_fits_fails_alone(oom_plugin, demo_images, tmp_path):
    LIMIT["never"] = {"digit-03-label3"}
    res = _run(demo_images, tmp_path / "run", batch_size=4)
    assert res.exit_code == 1, res.output
    recs = {r["id"]: r for r in _records(tmp_path / "run")}
    assert len(recs) == 8
    bad = recs.pop("digit-03-label3")
    assert bad["status"] == "error"
    assert "out of GPU memory at batch size 1" in bad["error"] and "--precision fp16" in bad["error"]
    assert all(r["status"] != "error" for r in recs.values())


def test_out_of_memory_is_recognised_across_backends():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
