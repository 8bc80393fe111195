#!/usr/bin/env bash
# The test suite: set up .venv/, then run every test (Triton kernels under the Triton interpreter
# when there is no GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
