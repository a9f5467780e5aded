"""Regenerate the report screenshots in docs/images/ from demo runs (needs Chromium + playwright).

    python scripts/report_screenshots.py [--out docs/images] [--chromium /usr/bin/chromium]

Makes two demo runs (PGD on the whole image, PGD limited to a central box), evaluates both, then
photographs the single-run report and the side-by-side comparison with headless Chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def cfx(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cfx_cli", *args], check=True)


def shoot(context, html: Path, out: Path, width: int, height: int, scroll_to: str, zoom: str | None) -> None:
    page = context.new_page()
    page.set_viewport_size({"width": width, "height": height})
    page.goto(html.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']")
    if zoom:
        page.select_option("#f-zoom", zoom)
    page.evaluate(f"document.querySelector({scroll_to!r}).scrollIntoView()")
    page.wait_for_function("[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    tmp = out.with_suffix(".raw.png")
    page.screenshot(path=str(tmp))
    page.close()
    # palette PNG: a quarter of the bytes, no visible loss for a UI screenshot
    with Image.open(tmp) as img:
        img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    tmp.unlink()
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from cfx_cli.demo import IMAGES_DIR

    images = os.path.relpath(IMAGES_DIR)  # relative, so the page shows short source paths
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cfx-shots-") as tmp:
        work = Path(tmp)
        mask = np.zeros((16, 16), np.uint8)
        mask[3:13, 3:13] = 255
        Image.fromarray(mask).save(work / "box.png")
        cfx("explain", images, "--method", "pgd", "--target", "auto", "--out", str(work / "pgd"))
        cfx("explain", images, "--method", "pgd", "--target", "auto", "--mask", str(work / "box.png"),
            "--out", str(work / "pgd-box"))
        cfx("eval", str(work / "pgd"), str(work / "pgd-box"))
        cfx("report", str(work / "pgd"))
        cfx("report", str(work / "pgd"), str(work / "pgd-box"), "--output", str(work / "compare.html"))
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(work / "profile"), executable_path=args.chromium, headless=True, args=FLAGS)
            shoot(context, work / "pgd" / "report.html", out / "report-gallery.png", 1280, 900, "#metrics",
                  None)
            shoot(context, work / "compare.html", out / "report-compare.png", 1280, 820, "#toolbar", None)
            context.close()


if __name__ == "__main__":
    main()
