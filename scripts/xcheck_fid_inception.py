"""Cross-check cfx's FID Inception against torch-fidelity's independent implementation on the same random
weights (published key layout). Not a test: torch-fidelity depends on torchvision, which cfx does not use;
its Inception module itself needs only torch, so it is loaded from an unpacked wheel without its package
``__init__``.

    pip download --no-deps torch-fidelity==0.4.0 -d /tmp/tf && python -m zipfile -e /tmp/tf/*.whl /tmp/tf-src
    python scripts/xcheck_fid_inception.py /tmp/tf-src

Prints the largest feature difference relative to the largest feature (0.0 when the architectures agree).
Both get 299×299 inputs normalized identically (torch-fidelity resizes like TensorFlow 1, pytorch-fid and cfx
with torch's bilinear interpolation; that step is left out of the comparison).
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path


def main(src: str) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(Path(src) / "torch_fidelity")]
    sys.modules["torch_fidelity"] = pkg
    from metric_weights import inception_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from cfx_plugins.nets.inception import load

    with tempfile.TemporaryDirectory() as tmp:
        path = inception_file(Path(tmp) / "inception.pth")
        ref = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        ours = load(path)
    u8 = (
        (torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    )
    with torch.no_grad():
        f_ref = ref(u8)
        f_ref = f_ref[0] if isinstance(f_ref, tuple | list) else f_ref
        f_ours = ours(
            ((u8.float() - 128) / 128 + 1) / 2
        )  # cfx maps x to 2x − 1; torch-fidelity (u8 − 128)/128
    rel = float((f_ref - f_ours).abs().max() / f_ref.abs().max())
    print(f"features {tuple(f_ours.shape)}; max |Δ| / max |f| = {rel:.3g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tf-src")
