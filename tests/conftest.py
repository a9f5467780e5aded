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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread (and OMP_NUM_THREADS=1 for child processes) for a whole module: on a shared 2-core
    machine torch's default threads oversubscribe and run many times slower. Modules take it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``, so it is set up before their other fixtures."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


def write_digit_folder(folder: Path, n: int, stem: str) -> Path:
    """The first n held-out demo digits as PNGs ``{stem}{i:03d}.png`` (8-bit by truncation)."""
    import numpy as np
    from PIL import Image

    from cfx_cli.demo.data import load_split

    x_te = load_split()[2]
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray((x_te[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{stem}{i:03d}.png")
    return folder
