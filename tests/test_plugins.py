"""Plugins: throw-away in-process plugins, broken and duplicate plugins, CFX_LOAD_PLUGINS, and the
example package installed with pip and used through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, run_cfx

from cfx_cli import plugins
from cfx_cli.explainers import Explainer
from cfx_cli.hookspecs import hookimpl


@pytest.fixture
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def test_builtins_are_entry_point_plugins(fresh_plugins):
    reg = plugins.get_registry(warn=False)
    assert reg.explainers["pgd"][1] == "pgd"
    assert "demo" in reg.classifier_adapters and "flip_rate" in reg.metrics
    info = reg.plugins["pgd"]
    assert info.builtin and info.distribution == "cfx" and info.version


def test_throwaway_plugin_registers_an_explainer(fresh_plugins):
    class Echo(Explainer):
        name = "echo_test"
        summary = "returns its input"

        def explain(self, batch):
            return []

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(Echo)

    plugins.register_plugin(Plugin(), name="throwaway")
    reg = plugins.get_registry(warn=False)
    assert reg.explainers["echo_test"] == (Echo, "throwaway")
    assert reg.plugins["throwaway"].explainers == ["echo_test"]


def test_duplicate_name_is_refused_naming_both(fresh_plugins, capsys):
    class FakePGD(Explainer):
        name = "pgd"

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(FakePGD)

    plugins.register_plugin(Plugin(), name="impostor")
    reg = plugins.get_registry()
    assert reg.explainers["pgd"][1] == "pgd"  # the first registration stands
    err = capsys.readouterr().err
    assert "impostor" in err and "'pgd'" in err and "refused" in err
    assert any("impostor" in e and "already registered by plugin 'pgd'" in e for e in reg.errors)


def _fake_dist(root, name, module_source, entry_name):
    """An installed distribution on a PYTHONPATH folder: a module plus its dist-info with an entry point."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[cfx]\n{entry_name} = {name}\n")


def test_broken_plugin_is_reported_and_never_breaks_the_cli(tmp_path):
    _fake_dist(tmp_path, "broken_plugin", "import does_not_exist_anywhere\n", "broken")
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_cfx("plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    infos = {i["name"]: i for i in json.loads(proc.stdout)}
    assert "No module named 'does_not_exist_anywhere'" in infos["broken"]["error"]
    assert infos["broken"]["version"] == "0.3" and infos["pgd"]["error"] is None
    proc = run_cfx("methods", env=env)
    assert proc.returncode == 0 and "pgd" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "broken" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: plugin 'broken'")


def test_cfx_load_plugins_limits_third_party_plugins(tmp_path):
    _fake_dist(tmp_path, "extra_plugin", """
        from cfx_cli.hookspecs import hookimpl
        from cfx_cli.explainers import Explainer

        class Extra(Explainer):
            name = "extra_method"
            summary = "from a third-party plugin"

        @hookimpl
        def register_explainers(register):
            register(Extra)
        """, "extra")
    env = {"PYTHONPATH": str(tmp_path)}
    assert "extra_method" in run_cfx("methods", env=env).stdout
    assert "extra_method" not in run_cfx("methods", env=env | {"CFX_LOAD_PLUGINS": ""}).stdout
    assert "extra_method" in run_cfx("methods", env=env | {"CFX_LOAD_PLUGINS": "extra"}).stdout
    # built-ins always load
    assert "pgd" in run_cfx("methods", env=env | {"CFX_LOAD_PLUGINS": ""}).stdout


@pytest.mark.slow
def test_example_package_installs_and_works_through_the_cli(tmp_path, demo_images):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "examples" / "cfx-example-plugin")], check=True)
    env = {"PYTHONPATH": str(target)}
    infos = {i["name"]: i for i in json.loads(run_cfx("plugins", "--json", env=env).stdout)}
    assert infos["example"]["distribution"] == "cfx-example-plugin"
    assert infos["example"]["explainers"] == ["patch_search"] and infos["example"]["metrics"] == ["changed_pixels"]
    out = tmp_path / "run"
    proc = run_cfx("explain", str(demo_images), "--method", "patch_search", "--limit", "4", "--out", str(out),
                   env=env)
    assert proc.returncode in (0, 1), proc.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4
    proc = run_cfx("eval", str(out), "--metrics", "flip_rate,changed_pixels", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["runs"][0]
    assert 0 < row["changed_pixels"] <= 1 and 0 <= row["flip_rate"] <= 1


THIRD_PARTY = """
    from cfx_cli.explainers import Explainer, ExplainOutput
    from cfx_cli.hookspecs import hookimpl
    from cfx_cli.params import Param

    class GrayRegion(Explainer):
        name = "gray_region"
        summary = "paints the region gray (a third-party explainer)"
        uses_region = True
        default_region = "auto"
        params = (Param("level", "float", 0.5, "gray level"),)
        presets = {"small": {"level": 0.25}}
        region_presets = {"small": {"region_area": 0.1, "region_cell": 2}}

        def explain(self, batch):
            level = self.params["level"]
            return [ExplainOutput(counterfactual=x * (1 - m) + level * m, params={"level": level})
                    for x, m in zip(batch.images, batch.masks)]

    @hookimpl
    def register_explainers(register):
        register(GrayRegion)

    @hookimpl
    def register_commands(cli, fit):
        @cli.command("gray-info")
        def gray_info(level: float = 0.5) -> None:
            '''Say what gray_region paints.'''
            print(f"gray_region paints {level}")

        @fit.command("gray")
        def fit_gray() -> None:
            print("nothing to learn")
    """


def test_third_party_explainer_uses_regions_and_its_own_commands_like_a_builtin(tmp_path, demo_images):
    """A third-party explainer with ``default_region``/``region_presets`` and commands of its own (the
    ``register_commands`` hook), used through the CLI exactly as RCSB and TIME are."""
    _fake_dist(tmp_path, "gray_plugin", THIRD_PARTY, "gray")
    env = {"PYTHONPATH": str(tmp_path)}
    out = tmp_path / "run"
    proc = run_cfx("explain", str(demo_images), "--method", "gray_region", "--set", "preset=small", "--limit", "2",
                   "--out", str(out), env=env)
    assert proc.returncode in (0, 1), proc.stderr
    assert "note: gray_region uses --region auto" in proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["mask"] == "auto" and info["parameters"]["level"] == 0.25
    # the preset's region options reached the region source (a = 0.1 in 2×2 cells, not the 0.3 default)
    assert info["region_options"]["region_area"] == 0.1 and info["region_options"]["region_cell"] == 2
    from PIL import Image

    for rec in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()):
        mask = np.asarray(Image.open(out / rec["mask"]).convert("L")) > 127
        cf = np.asarray(Image.open(out / rec["counterfactual"]).convert("RGB")).astype(int)
        orig = np.asarray(Image.open(out / rec["original"]).convert("RGB")).astype(int)
        assert 0 < mask.mean() <= 0.1 + 2 * 2 * 2 / mask.size  # the last 2×2 cell may overshoot a little
        assert (cf[~mask] == orig[~mask]).all() and (np.abs(cf[mask] - 64) <= 1).all()
    # an explicit --set wins over the preset's region option
    proc = run_cfx("explain", str(demo_images), "--method", "gray_region", "--set", "preset=small", "--set",
                   "region_area=0.5", "--limit", "1", "--out", str(tmp_path / "run2"), env=env)
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["region_options"]["region_area"] == 0.5
    # its commands, at the top level and as a learning stage, and where `cfx plugins` lists them
    proc = run_cfx("gray-info", "--level", "0.3", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "gray_region paints 0.3", proc.stderr
    proc = run_cfx("fit", "--help", env=env)
    assert "gray" in proc.stdout and "time" in proc.stdout
    assert run_cfx("fit", "gray", env=env).stdout.strip() == "nothing to learn"
    infos = {i["name"]: i for i in json.loads(run_cfx("plugins", "--json", env=env).stdout)}
    assert infos["gray"]["explainers"] == ["gray_region"]
    assert sorted(infos["gray"]["commands"]) == ["fit gray", "gray-info"] and infos["gray"]["error"] is None
    assert infos["time"]["commands"] == ["fit time"]
    # without the plugin the command does not exist (a usage error, exit 2)
    assert run_cfx("gray-info", env={"PYTHONPATH": str(tmp_path), "CFX_LOAD_PLUGINS": ""}).returncode == 2


def test_a_failing_register_commands_is_reported_and_never_breaks_the_cli(tmp_path):
    _fake_dist(tmp_path, "badcmd_plugin", """
        from cfx_cli.hookspecs import hookimpl

        @hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")
        """, "badcmd")
    env = {"PYTHONPATH": str(tmp_path)}
    infos = {i["name"]: i for i in json.loads(run_cfx("plugins", "--json", env=env).stdout)}
    assert "failed in register_commands: RuntimeError: no commands today" in infos["badcmd"]["error"]
    proc = run_cfx("fit", "time", "--help", env=env)
    assert proc.returncode == 0 and "--data" in proc.stdout
