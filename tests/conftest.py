"""Shared test helpers: the reference fixtures beside the checkout, the demo folder, the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The models in tests are tiny: one intra-op thread is as fast, and far faster when cores are shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


def fixture_dir(name: str) -> Path:
    """``../shared/fixtures/NAME``: skipped with a reason when absent, a failure under CI=true."""
    path = FIXTURES / name
    if not path.is_dir():
        message = f"reference fixture {path} is missing (it lives in ../shared/fixtures beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def demo_images() -> Path:
    from cfx_cli.demo import IMAGES_DIR

    return IMAGES_DIR


def run_cfx(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would (a subprocess), returning the completed process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cfx_cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout, input=input)


@pytest.fixture
def cfx():
    return run_cfx
