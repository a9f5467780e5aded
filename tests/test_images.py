"""Decoding every supported kind of image, per-file errors for bad ones, and input ids."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from conftest import run_cfx
from PIL import Image

from cfx_cli.errors import InputError
from cfx_cli.images import decode, discover, save_png


def _png_header_only(path, width, height):
    """A valid PNG signature + IHDR claiming width×height, and no image data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data)


def test_decode_modes(tmp_path):
    rgb = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 256).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.allclose(decode(tmp_path / "rgb.png"), rgb / 255.0, atol=1e-6)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    g = decode(tmp_path / "gray.png")
    assert g.shape == (16, 16, 3) and np.allclose(g[..., 1], rgb[..., 0] / 255.0)

    sixteen = (np.linspace(0, 65535, 256).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    d = decode(tmp_path / "deep.png")
    assert d.shape == (16, 16, 3)
    assert np.allclose(d[..., 0], sixteen / 65535.0, atol=1e-4)  # not clipped to white

    rgba = np.dstack([rgb, np.full((16, 16), 0, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.allclose(decode(tmp_path / "clear.png"), 1.0)  # fully transparent → the white background

    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    assert decode(tmp_path / "pal.png").shape == (16, 16, 3)

    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    assert np.abs(decode(tmp_path / "photo.jpg") - rgb / 255.0).mean() < 0.05


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert decode(tmp_path / "rot.jpg").shape == (20, 10, 3)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "bomb"])
def test_bad_files_raise_one_line(tmp_path, kind):
    p = tmp_path / f"{kind}.png"
    if kind == "empty":
        p.write_bytes(b"")
        expected = "empty file"
    elif kind == "text":
        p.write_text("this is not an image\n")
        expected = "not a readable image"
    elif kind == "truncated":
        buf = tmp_path / "full.png"
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf)
        p.write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
        expected = "truncated"
    else:
        _png_header_only(p, 30000, 30000)
        expected = "too large"
    with pytest.raises(InputError) as info:
        decode(p)
    message = str(info.value)
    assert str(p) in message and expected in message and "\n" not in message


def test_ids_unique_stable_and_path_safe(tmp_path):
    for rel in ("a/x.png", "b/x.png", "x.png", "x.jpg", "with space.png", "ünïcödé.png", "日本.png"):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(f)
    items = discover([str(tmp_path)])
    ids = [i.id for i in items]
    assert len(ids) == len(set(ids)) == 7
    for ident in ids:
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in ident), ident
        assert not ident.startswith(".")
    assert "a__x" in ids and "with_space" not in ids  # lossy slugs get a hash suffix
    assert [i.id for i in discover([str(tmp_path)])] == ids  # stable


def test_save_png_is_atomic_and_roundtrips(tmp_path):
    arr = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    save_png(arr, tmp_path / "o" / "a.png")
    assert list((tmp_path / "o").iterdir()) == [tmp_path / "o" / "a.png"]
    back = np.asarray(Image.open(tmp_path / "o" / "a.png"), dtype=np.float32) / 255
    assert np.abs(back - arr).max() <= 0.5 / 255 + 1e-6


@pytest.mark.slow
def test_mixed_folder_explains_good_and_records_bad(tmp_path, demo_images):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(demo_images.glob("*.png"))[:3]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zero.png").write_bytes(b"")
    full = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "notes.png").write_text("not an image")
    digit = np.asarray(Image.open(good[1]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(digit).save(folder / "deep16.png")
    rgba = np.dstack([np.asarray(Image.open(good[2]).convert("RGB")), np.full((16, 16), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    _png_header_only(folder / "bomb.png", 30000, 30000)

    out = tmp_path / "run"
    proc = run_cfx("explain", str(folder), "--method", "pgd", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    records = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert len(records) == 9
    errors = {k: r["error"] for k, r in records.items() if r["status"] == "error"}
    assert set(errors) == {"zero", "truncated", "notes", "bomb"}
    assert "empty file" in errors["zero"] and "truncated" in errors["truncated"]
    assert "not a readable image" in errors["notes"] and "too large" in errors["bomb"]
    for ident in ("deep16", "alpha", *(p.stem for p in good)):
        assert records[ident]["status"] in ("flipped", "not_flipped")
        assert np.asarray(Image.open(out / records[ident]["counterfactual"])).shape == (16, 16, 3)
    for message in errors.values():
        assert f"error: {message}" in proc.stderr
