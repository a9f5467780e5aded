"""The run report without a browser: derived pictures, links, escaping, comparison, eval.json."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from report_helpers import record, save, synthetic_run, write_run

from cfx_cli.errors import UsageError
from cfx_cli.evaluate import read_eval, write_eval_json
from cfx_cli.images import load_png
from cfx_cli.report import build_report
from cfx_cli.report.pictures import change_overlay, diff_heatmap, file_stem, mask_overlay

HOSTILE_ID = '<script>alert("id")</script>'
HOSTILE_LABEL = "<img src=x onerror=alert(1)>"
HOSTILE_ERROR = "</script><script>alert(2)</script><!--"


def page_data(html_text: str) -> dict:
    m = re.search(r'<script type="application/json" id="cfx-data">(.*?)</script>', html_text, re.S)
    assert m, "report has no data block"
    return json.loads(m.group(1))


def linked_files(html_path: Path, data: dict) -> list[Path]:
    base = html_path.parent
    out = []
    for row in data["rows"]:
        for cell in row["cells"]:
            for url in (cell or {}).get("img", {}).values():
                assert not url.startswith(("/", "http:", "https:", "file:")), url
                out.append((base / unquote(url)).resolve())
    return out


# --- pictures --------------------------------------------------------------------------------------

def test_heatmap_colours_follow_the_sign_of_the_change():
    a = np.full((4, 4, 3), 0.5, np.float32)
    b = a.copy()
    b[0, 0] = 0.9  # brighter → red
    b[3, 3] = 0.1  # darker → blue
    heat, gain = diff_heatmap(a, b)
    assert heat.shape == (4, 4, 3)
    r, g, bl = heat[0, 0]
    assert r > 0.6 and bl < 0.3, heat[0, 0]
    r, g, bl = heat[3, 3]
    assert bl > 0.6 and r < 0.3, heat[3, 3]
    np.testing.assert_allclose(heat[1, 1], [247 / 255] * 3, atol=1e-6)  # unchanged → neutral
    assert gain == pytest.approx(1 / 0.4, rel=0.05)


def test_heatmap_of_identical_images_is_neutral_and_not_blown_up():
    a = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    heat, gain = diff_heatmap(a, a)
    np.testing.assert_allclose(heat, 247 / 255, atol=1e-6)
    assert gain == pytest.approx(255.0)  # capped: sub-grey-level noise is never full colour


def test_mask_overlay_tints_only_the_mask():
    a = np.zeros((4, 4, 3), np.float32)
    m = np.zeros((4, 4, 1), np.float32)
    m[:2] = 1.0
    out = mask_overlay(a, m)
    assert (out[:2, :, 0] > out[:2, :, 2] + 0.3).all()  # amber inside
    np.testing.assert_allclose(out[2:], 0.25, atol=1e-6)  # dimmed grey outside


def test_change_overlay_is_red_where_it_changed():
    a = np.zeros((2, 2, 3), np.float32)
    b = a.copy()
    b[0, 0] = 1.0
    out = change_overlay(a, b, gain=1.0)
    assert out[0, 0, 0] > 0.6 and out[0, 0, 1] < 0.2
    np.testing.assert_allclose(out[1, 1], 0.2, atol=1e-6)


def test_file_stem_keeps_slugs_and_hashes_anything_else():
    assert file_stem("digit-00-label0") == "digit-00-label0"
    for hostile in (HOSTILE_ID, "../../etc/passwd", "..", ".hidden", "a/b", ""):
        stem = file_stem(hostile)
        assert re.fullmatch(r"id-[0-9a-f]{20}", stem), (hostile, stem)
    assert file_stem("x" * 200).startswith("id-")


# --- the page --------------------------------------------------------------------------------------

def test_report_of_a_run_links_real_images_and_matches_the_distance_metric(tmp_path):
    run = synthetic_run(tmp_path / "run", 12)
    out = build_report([run])
    assert out == run / "report.html"
    text = out.read_text(encoding="utf-8")
    data = page_data(text)
    assert [r["id"] for r in data["rows"]] == [f"img-{i:05d}" for i in range(12)]
    files = linked_files(out, data)
    assert files, "no images linked"
    for f in files:
        assert f.is_file(), f
        assert f.is_relative_to(run.resolve())
        assert load_png(f).shape[:2] == (16, 16)
    by_id = {r["id"]: r["cells"][0] for r in data["rows"]}
    for rec in (json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()):
        cell = by_id[rec["id"]]
        assert cell["status"] == rec["status"]
        if rec["counterfactual"]:
            a, b = load_png(run / rec["original"]), load_png(run / rec["counterfactual"])
            assert cell["l1"] == pytest.approx(float(np.abs(b - a).mean()), abs=1e-6)
            assert (run / "report" / "diff" / f"{rec['id']}.png").is_file()
            assert (run / "report" / "overlay" / f"{rec['id']}.png").is_file()
            assert cell["overlay"] == "change"
        else:
            assert cell["l1"] is None and "diff" not in cell["img"]
    # self-contained: no external resources, only the inline script allowed by the CSP
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "<link" not in text
    assert "script-src 'sha256-" in text
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_derived_images_are_reused_and_redone_when_their_source_changes(tmp_path):
    run = synthetic_run(tmp_path / "run", 2)
    build_report([run])
    diff = run / "report" / "diff" / "img-00000.png"
    first = diff.stat().st_mtime_ns
    build_report([run])
    assert diff.stat().st_mtime_ns == first
    time.sleep(0.01)
    cf = run / "counterfactuals" / "img-00000.png"
    save(run, "counterfactuals/img-00000.png", np.zeros((16, 16, 3), np.uint8))
    os.utime(cf, ns=(time.time_ns(), time.time_ns()))
    build_report([run])
    assert diff.stat().st_mtime_ns > first


def test_a_rewritten_report_decodes_nothing_and_survives_a_broken_index(tmp_path, monkeypatch):
    import cfx_cli.images

    run = synthetic_run(tmp_path / "run", 8)
    first = page_data(build_report([run]).read_text(encoding="utf-8"))
    index = run / "report" / "index.json"
    assert len(json.loads(index.read_text())["entries"]) == 4

    def no_decoding(*_a, **_k):
        raise AssertionError("an unchanged run must not decode images again")

    monkeypatch.setattr(cfx_cli.images, "load_png", no_decoding)
    again = page_data(build_report([run]).read_text(encoding="utf-8"))
    assert again["rows"] == first["rows"]
    monkeypatch.undo()
    for junk in ("[1, 2]", "{not json", '{"version": 1, "entries": []}'):
        index.write_text(junk)
        assert page_data(build_report([run]).read_text(encoding="utf-8"))["rows"] == first["rows"]
        assert json.loads(index.read_text())["version"] == 1


def test_mask_runs_get_a_mask_overlay(tmp_path):
    root = tmp_path / "run"
    a = np.zeros((8, 8, 3), np.uint8)
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    rec = record("x", original=save(root, "originals/x.png", a),
                 counterfactual=save(root, "counterfactuals/x.png", a + 9),
                 mask=save(root, "masks/x.png", m), target_prob_after=0.8, cf_label="dog")
    write_run(root, [rec])
    data = page_data(build_report([root]).read_text(encoding="utf-8"))
    cell = data["rows"][0]["cells"][0]
    assert cell["overlay"] == "mask"
    ov = load_png(root / "report" / "overlay" / "x.png")
    assert ov[3, 3, 0] > ov[3, 3, 2] + 0.2  # amber inside the mask
    assert ov[0, 0].max() < 0.3  # dimmed outside


def test_manifest_text_is_escaped_and_hostile_paths_are_not_followed(tmp_path, capsys):
    root = tmp_path / "run"
    a = np.zeros((16, 16, 3), np.uint8)
    (tmp_path / "secret.png").write_bytes(b"not for the page")
    recs = [
        record(HOSTILE_ID, source_label=HOSTILE_LABEL, target_label=HOSTILE_LABEL, cf_label=HOSTILE_LABEL,
               original=save(root, "originals/h.png", a),
               counterfactual=save(root, "counterfactuals/h.png", a + 30),
               target_prob_after=0.7, params={HOSTILE_LABEL: HOSTILE_ERROR}, source=HOSTILE_ERROR),
        record("escape", "error", error=HOSTILE_ERROR, original="../secret.png"),
    ]
    write_run(root, recs, {"method": HOSTILE_LABEL, "target": HOSTILE_ID, "parameters": {"k": HOSTILE_ERROR}})
    out = build_report([root])
    text = out.read_text(encoding="utf-8")
    for raw in (HOSTILE_ID, HOSTILE_LABEL, HOSTILE_ERROR, "<img src=x", "<script>alert", "</script><script>"):
        assert raw not in text, raw
    assert text.count("<script") == 2  # the data block and the page's own script, nothing injected
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # the run card shows the method name as text
    data = page_data(text)
    ids = [r["id"] for r in data["rows"]]
    assert ids == [HOSTILE_ID, "escape"]  # JSON round-trips the exact strings for textContent
    cell = data["rows"][0]["cells"][0]
    assert cell["source_label"] == HOSTILE_LABEL and cell["params"] == {HOSTILE_LABEL: HOSTILE_ERROR}
    assert data["rows"][1]["cells"][0]["error"] == HOSTILE_ERROR
    # the hostile id became a hashed file name inside the run dir; ../secret.png is not linked
    assert [p.name for p in (root / "report" / "diff").iterdir()] == [f"{file_stem(HOSTILE_ID)}.png"]
    assert "secret" not in json.dumps(data)
    assert "outside the run directory" in capsys.readouterr().err


def test_odd_manifests_still_give_a_page(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    lines = [
        json.dumps(record("nan", "not_flipped", target_prob_after=float("inf"), params={"w": float("nan")})),
        "[1, 2]",
        json.dumps(record("odd-status", "running")),
    ]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "run.json").write_text('["not", "a", "dict"]', encoding="utf-8")
    data = page_data(build_report([root]).read_text(encoding="utf-8"))
    cells = {r["id"]: r["cells"][0] for r in data["rows"]}
    assert cells["nan"]["target_prob_after"] is None and cells["nan"]["params"] == {"w": "nan"}
    assert cells["odd-status"]["status"] == "error"
    assert "1 manifest lines are not records" in capsys.readouterr().err


def test_several_runs_are_matched_by_input_id(tmp_path):
    a = synthetic_run(tmp_path / "pgd", 6)
    b = synthetic_run(tmp_path / "dime", 4, seed=1)
    out_dir = tmp_path / "elsewhere" / "deeper"
    out = build_report([a, b], out_dir / "compare.html")
    data = page_data(out.read_text(encoding="utf-8"))
    assert [r["name"] for r in data["runs"]] == ["pgd", "dime"]
    rows = {r["id"]: r["cells"] for r in data["rows"]}
    assert len(rows) == 6
    assert all(c[0] is not None for c in rows.values())
    assert [rows[f"img-{i:05d}"][1] is None for i in range(6)] == [False] * 4 + [True] * 2
    for f in linked_files(out, data):  # links climb out of the output folder into each run
        assert f.is_file(), f
    with pytest.raises(UsageError, match="--output"):
        build_report([a, b])


def test_same_folder_names_are_told_apart(tmp_path):
    a = synthetic_run(tmp_path / "x" / "run", 2)
    b = synthetic_run(tmp_path / "y" / "run", 2)
    data = page_data(build_report([a, b], tmp_path / "c.html").read_text(encoding="utf-8"))
    names = [r["name"] for r in data["runs"]]
    assert len(set(names)) == 2


def test_eval_json_is_shown_and_marked_stale_when_the_run_changes(tmp_path):
    run = synthetic_run(tmp_path / "run", 4)
    write_eval_json(run, {"n": 4, "flip_rate": 0.5, "l1": 0.0123}, {"fid": "needs inception weights"},
                    {"flip_rate": False, "l1": True}, None)
    text = build_report([run]).read_text(encoding="utf-8")
    metrics = text[text.index('id="metrics"'): text.index("</section>", text.index('id="metrics"'))]
    assert "flip_rate" in metrics and "0.0123" in metrics and "needs inception weights" in metrics
    assert "computed before the run last changed" not in metrics
    # a metric computed later on the same manifest is merged, not replacing the first ones
    write_eval_json(run, {"n": 4, "seconds": 0.25}, {}, {"seconds": True}, "efficiency")
    ev = read_eval(run)
    assert ev["values"] == {"n": 4, "flip_rate": 0.5, "l1": 0.0123, "seconds": 0.25}
    with open(run / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record("late", "skipped")) + "\n")
    assert read_eval(run)["stale"]
    text = build_report([run]).read_text(encoding="utf-8")
    assert "computed before the run last changed" in text
    # a changed manifest starts afresh
    write_eval_json(run, {"n": 5}, {}, {}, None)
    assert read_eval(run)["values"] == {"n": 5}


def metrics_section(html_text: str) -> str:
    start = html_text.index('id="metrics"')
    return html_text[start: html_text.index("</section>", start)]


def test_only_numeric_quality_columns_get_a_direction(tmp_path):
    a = synthetic_run(tmp_path / "a", 4)
    b = synthetic_run(tmp_path / "b", 4, seed=1)
    # "hardware" with a direction is what eval.json files held before metrics could declare unranked columns
    directions = {"flip_rate": False, "l1": True, "hardware": True, "cout_unchanged": None}
    write_eval_json(a, {"flip_rate": 0.5, "l1": 0.02, "hardware": "cpu", "cout_unchanged": 3}, {}, directions, None)
    write_eval_json(b, {"flip_rate": 0.25, "l1": 0.01, "hardware": "cuda", "cout_unchanged": 0}, {}, directions,
                    None)
    metrics = metrics_section(build_report([a, b], tmp_path / "cmp.html").read_text(encoding="utf-8"))
    rows = dict(re.findall(r'<tr><th scope="row">([a-z_0-9]+)<span class="muted">([^<]*)</span>', metrics))
    assert set(rows) == {"flip_rate", "l1", "hardware", "cout_unchanged"}
    assert [rows[c] for c in ("flip_rate", "l1", "hardware", "cout_unchanged")] == [" ↑", " ↓", "", ""]
    assert 'class="best">0.5<' in metrics and 'class="best">0.01<' in metrics
    assert metrics.count('class="best"') == 2  # nothing is "best" at being a count or a device name


def test_cfx_eval_records_which_columns_have_no_direction(tmp_path, cfx):
    run = synthetic_run(tmp_path / "run", 8)
    res = cfx("eval", str(run), "--metrics", "target_prob,efficiency")
    assert res.returncode == 0, res.stderr
    dirs = json.loads((run / "eval.json").read_text(encoding="utf-8"))["lower_is_better"]
    assert dirs == {"target_prob_before": None, "target_prob_after": False, "seconds": True, "nfe": True,
                    "hardware": None}
    metrics = metrics_section(build_report([run]).read_text(encoding="utf-8"))
    assert "target_prob_before<span class=\"muted\"></span>" in metrics
    assert "seconds<span class=\"muted\"> ↓</span>" in metrics


def test_cfx_eval_refreshes_the_runs_report(tmp_path, cfx):
    run = synthetic_run(tmp_path / "run", 8)
    elsewhere = build_report([run], tmp_path / "copy.html")
    assert "No metrics yet" in build_report([run]).read_text(encoding="utf-8")
    res = cfx("eval", str(run), "--metrics", "flip_rate,distance")
    assert res.returncode == 0, res.stderr
    ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert ev["values"]["flip_rate"] == pytest.approx(0.5)  # 2 flipped of 4 explained
    assert ev["lower_is_better"]["l1"] is True
    html_text = (run / "report.html").read_text(encoding="utf-8")  # no `cfx report` in between
    assert "No metrics yet" not in html_text
    assert re.search(r'flip_rate<span class="muted"> ↑</span></th><td class="">0.5</td>', metrics_section(html_text))
    assert "No metrics yet" in elsewhere.read_text(encoding="utf-8")  # pages written elsewhere: `cfx report`
    res = cfx("report", str(run))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {run / 'report.html'}"
    assert "flip_rate" in (run / "report.html").read_text(encoding="utf-8")


def test_cfx_eval_writes_no_report_where_there_was_none(tmp_path, cfx):
    run = synthetic_run(tmp_path / "run", 4)
    res = cfx("eval", str(run), "--metrics", "flip_rate")
    assert res.returncode == 0, res.stderr
    assert (run / "eval.json").is_file() and not (run / "report.html").exists()


def test_cfx_report_usage_errors_are_one_line(tmp_path, cfx):
    a = synthetic_run(tmp_path / "a", 2)
    b = synthetic_run(tmp_path / "b", 2)
    res = cfx("report", str(a), str(b))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: cfx report: comparing several runs needs --output FILE.html"
    res = cfx("report", str(tmp_path / "nope"))
    assert res.returncode == 2 and "nope" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cfx("report", str(a), str(b), "--output", str(tmp_path / "cmp.html"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cmp.html").is_file()


@pytest.mark.slow
def test_a_run_of_3000_inputs_stays_usable(tmp_path):
    run = synthetic_run(tmp_path / "big", 3000)
    out = build_report([run])
    text = out.read_text(encoding="utf-8")
    data = page_data(text)
    assert len(data["rows"]) == 3000
    assert len(text) < 4_000_000  # one page of data, the pictures stay files
    derived = sorted((run / "report" / "diff").iterdir())
    assert len(derived) == 1500
    stamps = {p.name: p.stat().st_mtime_ns for p in derived}
    # a second build reuses every derived picture (what keeps it fast; timings live in bench/report_scale.py)
    build_report([run])
    assert {p.name: p.stat().st_mtime_ns for p in (run / "report" / "diff").iterdir()} == stamps


def test_cfx_explain_ends_with_a_report(tmp_path, cfx, demo_images):
    out = tmp_path / "run"
    res = cfx("explain", str(demo_images), "--method", "pgd", "--limit", "2", "--set", "iterations=3",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = page_data((out / "report.html").read_text(encoding="utf-8"))
    assert [r["id"] for r in data["rows"]] == ["digit-00-label0", "digit-01-label1"]
    assert data["runs"][0]["method"] == "pgd" and data["runs"][0]["classifier"] == "demo:digits"
    for f in linked_files(out / "report.html", data):
        assert f.is_file(), f


def test_a_failing_report_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    import cfx_cli.report.build
    from cfx_cli.pipeline import ExplainRequest, _write_report

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(cfx_cli.report.build, "build_report", broken)
    _write_report(tmp_path, ExplainRequest(inputs=[], method="pgd"))  # no exception
    err = capsys.readouterr().err
    assert "report.html not written: OSError: disk full" in err and f"cfx report {tmp_path}" in err
    with pytest.raises(OSError):
        _write_report(tmp_path, ExplainRequest(inputs=[], method="pgd", options={"debug": True}))


def test_cfx_merge_ends_with_a_report(tmp_path, cfx):
    a = synthetic_run(tmp_path / "shard0", 4)
    b = synthetic_run(tmp_path / "shard1", 4, prefix="other")
    res = cfx("merge", str(a), str(b), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    data = page_data((tmp_path / "merged" / "report.html").read_text(encoding="utf-8"))
    assert len(data["rows"]) == 8
    for f in linked_files(tmp_path / "merged" / "report.html", data):
        assert f.is_file() and f.is_relative_to((tmp_path / "merged").resolve()), f
