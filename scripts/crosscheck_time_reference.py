"""Cross-check cfx's TIME against the authors' generation loop (github.com/guillaumejs2403/TIME, generate-ce.py).

Nothing of that code is in cfx: point this script at a checkout you have and at a Python with the authors'
pinned libraries (their time_env.yml: diffusers 0.16.1, transformers 4.26.1; today's diffusers renamed
``DDIMInverseScheduler``'s arguments and transformers 5 no longer loads with huggingface_hub < 1). For example:

    python -m venv /tmp/time-ref && /tmp/time-ref/bin/pip install --no-deps diffusers==0.16.1 \\
        transformers==4.26.1 tokenizers==0.13.3 huggingface_hub==0.25.2 importlib_metadata zipp
    echo "$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')" \\
        > "$(/tmp/time-ref/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-cfx.pth"
    python scripts/crosscheck_time_reference.py --time PATH/TIME --ref-python /tmp/time-ref/bin/python

(the ``.pth`` line lends torch, numpy, safetensors … of cfx's venv to the old one, after its own packages).
``scripts/_time_reference_run.py`` runs the authors' loop there on the inputs of ``tests/fixtures/time-xcheck``
(two images, fixed token vectors, the tiny random SD folder of ``tests/time_xcheck.py``, ε- and v-prediction);
this script runs cfx's TIME (``--set preset=published``: legacy EDICT pairing, g = w) on the same inputs and
prints the max abs difference of every intermediate and every attempt's counterfactual; exits 1 if one exceeds
the fixture README's tolerance. ``--write-fixture`` stores the reference outputs in the fixture (CI then checks
cfx against them without the authors' code: ``tests/test_time_parity.py``); ``--make-inputs`` regenerates the
inputs first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixture helpers live in tests/

from tests.time_xcheck import (  # noqa: E402
    XCHECK,
    assemble_folder,
    cfx_generator,
    expected_to_match,
    load_inputs,
    make_inputs,
    run_cfx_case,
    tolerance,
)

EDICT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "time-edict"


def compare(ref: dict, ours: dict, cases: list[dict]) -> list[str]:
    failures = []
    by_name = {c["name"]: c for c in cases}
    for key in sorted(ref, key=lambda k: (k.split("_")[0], len(k), k)):
        diff = float((ref[key].float() - ours[key].float().cpu()).abs().max())
        if not expected_to_match(by_name[key.split("_")[0]], key):
            print(f"{key:32s} {diff:.2e}   (differs by design, see the fixture README)")
            continue
        bad = diff > tolerance(key)
        failures += [key] if bad else []
        print(f"{key:32s} {diff:.2e}{'   <-- FAIL' if bad else ''}")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time", required=True, help="a checkout of guillaumejs2403/TIME (a work tree)")
    ap.add_argument("--ref-python", required=True, help="python with diffusers 0.16.1 / transformers 4.26.1")
    ap.add_argument("--edict-fixture", type=Path, default=EDICT_FIXTURE)
    ap.add_argument("--make-inputs", action="store_true", help="regenerate the fixture's inputs first")
    ap.add_argument("--write-fixture", action="store_true", help="store the reference outputs in the fixture")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if a.make_inputs:
        make_inputs(a.edict_fixture)
    image, sources, cases = load_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {pred: assemble_folder(a.edict_fixture, Path(tmp) / pred, pred)
                   for pred in ("epsilon", "v_prediction")}
        out = Path(tmp) / "reference.safetensors"
        # a list of arguments, no shell
        subprocess.run([a.ref_python, str(Path(__file__).with_name("_time_reference_run.py")), "--time", a.time,
                        "--folder-eps", str(folders["epsilon"]), "--folder-v", str(folders["v_prediction"]),
                        "--xcheck", str(XCHECK), "--out", str(out)], check=True)
        ref = load_file(str(out))
        ours = {}
        for case in cases:
            ours.update(run_cfx_case(cfx_generator(folders[case["prediction_type"]]), case, image, sources))
    failures = compare(ref, ours, cases)
    if a.write_fixture:
        save_file(ref, str(XCHECK / "reference.safetensors"))
        print(f"wrote {XCHECK / 'reference.safetensors'}")
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("every comparison expected to match is within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
