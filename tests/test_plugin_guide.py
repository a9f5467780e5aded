"""docs/plugins.md: its reference blocks are generated from the code (and current), and the plugin its code blocks
make up installs with pip and works through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cfx

GUIDE = REPO / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.S | re.M)


def guide_files() -> dict[str, str]:
    """The guide's code blocks marked ```LANG file=PATH, by path."""
    files = dict(FILE_BLOCK.findall(GUIDE.read_text(encoding="utf-8")))
    assert {"pyproject.toml", "src/cfx_signed_steps/__init__.py"} <= set(files)
    return files


def test_generated_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_plugin_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_reference_names_every_param_kind_and_protocol_member():
    from cfx_cli.params import KINDS

    text = GUIDE.read_text(encoding="utf-8")
    for kind in KINDS:
        assert f"| `{kind}` |" in text
    for needle in ("def predict_proba(self, images: torch.Tensor) -> torch.Tensor:",
                   "def explained(self, required: bool = False) -> list[dict]:",
                   "def image(self, relpath: str) -> np.ndarray:",
                   "targets: torch.Tensor  # (N,) int64", "min: float | None = None"):
        assert needle in text, needle


def test_the_generator_notices_drift(tmp_path, monkeypatch):
    """--check is not vacuous: a hand edit inside a generated block makes it fail."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_plugin_docs
    finally:
        sys.path.pop(0)
    stale = GUIDE.read_text(encoding="utf-8").replace("| `floats` |", "| `floatz` |")
    assert gen_plugin_docs.render(stale) != stale
    assert gen_plugin_docs.render(gen_plugin_docs.render(stale)) == gen_plugin_docs.render(stale)


@pytest.mark.slow
def test_plugin_built_from_the_guide_installs_and_runs(tmp_path, demo_images):
    package = tmp_path / "cfx-signed-steps"
    for rel, text in guide_files().items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text, encoding="utf-8")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True)
    env = {"PYTHONPATH": str(target)}
    infos = {i["name"]: i for i in json.loads(run_cfx("plugins", "--json", env=env).stdout)}
    info = infos["signed_steps"]
    assert info["distribution"] == "cfx-signed-steps" and info["version"] == "0.1.0" and not info["error"]
    assert info["explainers"] == ["signed_steps"] and info["metrics"] == ["mean_change"]
    shown = run_cfx("methods", "signed_steps", env=env).stdout
    assert "(>= 1)" in shown and "(in [0, 1])" in shown and "one of 'sign', 'max'" in shown
    # the declared bound is enforced before any work
    proc = run_cfx("explain", str(demo_images), "--method", "signed_steps", "--set", "steps=0",
                   "--out", str(tmp_path / "bad"), env=env)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --set steps='0': must be >= 1"
    out = tmp_path / "run"
    proc = run_cfx("explain", str(demo_images), "--method", "signed_steps", "--limit", "4", "--out", str(out),
                   env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4 and sum(r["status"] == "flipped" for r in records) >= 3, records
    assert all(r["params"]["direction"] == "sign" and r["nfe"] >= 3 for r in records)
    proc = run_cfx("eval", str(out), "--metrics", "flip_rate,mean_change", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert 0 < row["mean_change"] < 0.5 and row["flip_rate"] >= 0.75
