"""The demo digits classifier network (a small CNN on 3×16×16 images in [0, 1])."""

from __future__ import annotations

import torch
from torch import nn

from cfx_cli.demo import DEMO_DIR

WEIGHTS = "digits_classifier.safetensors"
#: ``demo:digits-robust``: the same architecture, adversarially trained (scripts/train_demo_robust.py): the guide of
#: robust-classifier guidance (cfx_cli/guide.py), never the explained classifier nor a judge
ROBUST_WEIGHTS = "digits_robust.safetensors"


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inputs in [0, 1]; the preprocessing is part of the model, as a user's classifier would have it
        return self.head(self.features((x - 0.5) / 0.5))


def load_pretrained(device: str = "cpu", weights: str = WEIGHTS) -> DigitsCNN:
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(DEMO_DIR / weights)))
    return model.eval().to(device)
