"""The embedded digits demo: data preparation, the classifier network and its committed weights."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
IMAGES_DIR = DEMO_DIR / "images"
JUDGES_DIR = DEMO_DIR / "judges"  # the metric networks (judges.py)
RESOLUTION = 16
LABELS = [str(i) for i in range(10)]
