"""The CLI as a user meets it: help without torch, usage errors in one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_cfx


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "sys.argv = ['cfx', '--help']\n"
        "from cfx_cli import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'PIL', 'httpx')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Commands" in out or "explain" in out
    assert out.strip().splitlines()[-1] == "HEAVY:", out


def test_version_and_commands_listed():
    proc = run_cfx("--help")
    assert proc.returncode == 0
    for command in ("explain", "eval", "classify", "plugins", "methods", "metrics"):
        assert command in proc.stdout
    assert run_cfx("--version").stdout.startswith("cfx ")


def _one_line_error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_method_is_usage_error(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "nope", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "unknown method 'nope'" in line and "pgd" in line
    assert not (tmp_path / "r").exists()  # no work started


def test_unknown_target_lists_classes(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--target", "eleven",
                   "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "unknown target 'eleven'" in line and "0, 1, 2" in line


def test_bad_set_value_and_unknown_param(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "eps=lots", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "eps='lots': expected float" in _one_line_error(proc)
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--set", "alpha=1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "no parameter 'alpha'" in _one_line_error(proc)


def test_backend_options_and_method_options_are_refused_where_they_do_not_apply(tmp_path, demo_images):
    """--backend & co. for a method that runs nothing on a backend, and TIME's --tokens for another method: one
    line, exit 2, before any work (they used to be ignored silently)."""
    for method in ("rcsb", "eced", "pgd"):
        proc = run_cfx("explain", str(demo_images), "--method", method, "--backend", "onnx", "--out",
                       str(tmp_path / "r"))
        assert proc.returncode == 2 and f"method {method!r} runs no forward-only network calls on a backend" in \
            _one_line_error(proc)
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--channels-last", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--channels-last does not apply" in _one_line_error(proc)
    assert "only --precision applies" in _one_line_error(proc)
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--tokens", "t", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "method 'pgd' has no parameter 'tokens'" in _one_line_error(proc)
    proc = run_cfx("explain", str(demo_images), "--method", "time", "--tokens", "a", "--set", "tokens=b",
                   "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--tokens and --set tokens=... name the same option" in _one_line_error(proc)
    assert not (tmp_path / "r").exists()


def test_unreadable_config_and_unknown_classifier(tmp_path, demo_images):
    bad = tmp_path / "c.toml"
    bad.write_text("method = [unclosed\n")
    proc = run_cfx("explain", str(demo_images), "--config", str(bad))
    assert proc.returncode == 2 and "invalid TOML" in _one_line_error(proc)
    proc = run_cfx("explain", str(demo_images), "--method", "pgd", "--classifier", "ftp:x",
                   "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "unknown classifier scheme 'ftp'" in _one_line_error(proc)


def test_missing_input_is_usage_error(tmp_path):
    proc = run_cfx("explain", str(tmp_path / "nowhere"), "--method", "pgd")
    assert proc.returncode == 2 and "no such file or folder" in _one_line_error(proc)


def test_config_file_supplies_options(tmp_path, demo_images):
    cfg = tmp_path / "run.toml"
    out = tmp_path / "run"
    cfg.write_text(f'method = "pgd"\ntarget = "auto"\nlimit = 3\nout = "{out.as_posix()}"\n'
                   '[params]\niterations = 5\n')
    proc = run_cfx("explain", str(demo_images), "--config", str(cfg), "--set", "iterations=7")
    assert proc.returncode in (0, 1), proc.stderr
    import json

    info = json.loads((out / "run.json").read_text())
    assert info["parameters"]["iterations"] == 7  # --set beats the config file
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


def test_debug_shows_traceback(tmp_path, demo_images):
    proc = run_cfx("explain", str(demo_images), "--method", "nope", env={"CFX_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_completions_are_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_completions.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = "bash setup.sh --dev && .venv/bin/python -m pytest"
    assert command in readme and command in ci


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly: a missing one breaks wheels."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for root, name in ((REPO / "cfx", "cfx"), (REPO / "cfx_cli", "cfx_cli"), (REPO / "cfx_plugins", "cfx_plugins")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
