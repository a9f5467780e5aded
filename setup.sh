#!/usr/bin/env bash
# Set up cfx in ./.venv.  Usage: bash setup.sh [--dev]
#   --dev  also installs the test and lint tools (pytest, ruff, scikit-learn, ray, onnx, playwright) and
#          Debian's chromium for the report's browser test (scripts/install-browser.sh; needs root or sudo).
# torch is installed first and pinned, so pip never swaps in a different build: on a machine without an
# NVIDIA GPU set CFX_TORCH_INDEX to a CPU-only wheel index to avoid the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${CFX_TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC" >&2
  if [ -n "${CFX_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" "$TORCH_SPEC" --index-url "$CFX_TORCH_INDEX"
  else
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi

if [ "${1:-}" = "--dev" ]; then
  echo "setup: installing cfx with the dev extra" >&2
  "${PIP[@]}" -e ".[dev]"
  bash scripts/install-browser.sh >&2
else
  echo "setup: installing cfx" >&2
  "${PIP[@]}" -e .
fi
echo "setup: done; the cfx command is .venv/bin/cfx" >&2
