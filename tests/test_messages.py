"""What a user reads: only cfx's own lines (library chatter silenced, shown with CFX_DEBUG=1), a missing file said
first, hyperparameter bounds checked in one line before any work."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import run_cfx

from cfx_cli.errors import UsageError
from cfx_cli.params import KINDS, Param
from cfx_cli.plugins import get_registry

#: the lines cfx itself writes while explaining (cfx_cli/quiet.py lists them): tagged messages, the progress lines
#: of its own bar and the one summary line per run
CFX_LINE = re.compile(
    r"^(?:(?:note|warning|error|skipped|resuming): .+"
    r"|explain \([\w, ×]+\): \d+/\d+ \(\d+%\) elapsed \d+s eta (?:\?|\d+s|\d+m\d\ds|\d+:\d\d:\d\d)(?: .*)?"
    r"|\d+ inputs: \d+ flipped, \d+ not flipped, \d+ skipped, \d+ errors.* → .+)$"
)


def _foreign_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not CFX_LINE.match(line)]


def test_dime_demo_output_is_cfx_s_own(tmp_path, demo_images):
    out = tmp_path / "run"
    proc = run_cfx("explain", str(demo_images), "--method", "dime", "--limit", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert _foreign_lines(proc.stdout) == [] and _foreign_lines(proc.stderr) == [], (proc.stdout, proc.stderr)
    assert "accelerate" not in proc.stdout + proc.stderr and "Warning" not in proc.stdout + proc.stderr
    assert proc.stdout.startswith("2 inputs: ")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is not None,
                    reason="diffusers only prints its accelerate hint when accelerate is missing")
def test_debug_shows_the_library_chatter(tmp_path, demo_images):
    """The silenced message is real: CFX_DEBUG=1 lets it through (so the test above can fail)."""
    proc = run_cfx("explain", str(demo_images), "--method", "dime", "--limit", "1", "--out", str(tmp_path / "r"),
                   "--set", "scales=8", env={"CFX_DEBUG": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "accelerate" in proc.stderr and _foreign_lines(proc.stderr)


def test_library_warnings_and_logs_are_silenced_unless_debug():
    code = (
        "import logging, warnings\n"
        "from cfx_cli.quiet import configure_cli_output\n"
        "configure_cli_output()\n"
        "warnings.warn('UserWarning from a library')\n"
        "logging.getLogger('somelib').warning('somelib logs a warning')\n"
        "from transformers.utils import logging as tl\n"
        "tl.get_logger('transformers.x').warning('transformers logs a warning')\n"
    )
    for debug, expected in (("0", ""), ("1", "UserWarning from a library")):
        env = {"CFX_DEBUG": debug, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        if expected:
            for said in ("UserWarning from a library", "somelib logs a warning", "transformers logs a warning"):
                assert said in proc.stderr, proc.stderr
        else:
            assert proc.stderr == ""


def test_missing_checkpoint_is_said_first(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "dime", "--model", "adm:/nonexistent.pt",
                   "--out", str(tmp_path / "r"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == ["error: --model adm:/nonexistent.pt: /nonexistent.pt: no such file"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, says", [
    ("iterations=0", "--set iterations='0': must be >= 1"),
    ("eps=2", "--set eps='2': must be in [0, 1]"),
    ("step=-1/255", "--set step='-1/255': must be >= 0"),
])
def test_out_of_bounds_set_is_a_one_line_usage_error(tmp_path, demo_images, setting, says):
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--set", setting, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {says}"], proc.stderr
    assert not (tmp_path / "r").exists()  # checked before any work


def test_param_bounds_choices_and_kinds():
    p = Param("p", "float", 0.5, "a probability", min=0.0, max=1.0)
    assert p.parse("1/4") == 0.25 and p.parse(1) == 1.0
    for bad in ("1.5", "-0.1", "nan", "1/0"):
        with pytest.raises(UsageError, match=r"^--set p="):
            p.parse(bad)
    scales = Param("scales", "floats", (8.0,), "weights", min=0.0)
    assert scales.parse("8,10") == (8.0, 10.0)
    with pytest.raises(UsageError, match="must be >= 0"):
        scales.parse("8,-1")
    mode = Param("mode", "str", "a", "mode", choices=("a", "b"))
    with pytest.raises(UsageError, match="must be one of a, b"):
        mode.parse("c")
    with pytest.raises(ValueError, match="unknown kind"):
        Param("x", "integer", 1, "typo in the kind")
    with pytest.raises(ValueError, match="min/max apply"):
        Param("x", "str", "", "bounds on text", min=1)
    assert set(KINDS) == {"int", "float", "bool", "str", "floats"}
    for kind, (python_type, _) in KINDS.items():  # the documented Python type is what parse returns
        assert type(Param("x", kind, None, "").parse({"int": "3", "float": "0.5", "bool": "yes", "str": "s",
                                                       "floats": "1,2"}[kind])).__name__ == python_type.split("[")[0]


def test_builtin_defaults_and_presets_are_within_their_bounds():
    from cfx_plugins.explainers.time.fit import FIT_PARAMS, FIT_PRESETS

    groups = [(name, cls.params, cls.presets) for name, (cls, _) in get_registry().explainers.items()]
    groups.append(("fit time", FIT_PARAMS, FIT_PRESETS))
    bounded = 0
    for name, params, presets in groups:
        by_name = {p.name: p for p in params}
        for p in params:
            assert p.parse(p.default, where=f"{name} default") == p.default or p.kind == "floats"
            bounded += p.min is not None or p.max is not None
        for preset, values in presets.items():
            for key, value in values.items():
                by_name[key].parse(value, where=f"{name} preset {preset}:")
    assert bounded >= 30  # the built-in methods declare their ranges


def test_methods_shows_bounds_and_choices():
    proc = run_cfx("methods", "time")
    assert proc.returncode == 0
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("p "))
    assert line.rstrip().endswith("(in [0, 1])")
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("edict "))
    assert "(one of 'exact', 'legacy')" in line
