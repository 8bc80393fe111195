#!/usr/bin/env bash
# The main job: set up .venv/, then run the demo (GMTAdamW next to AdamW on a small model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
