#!/usr/bin/env bash
# The main job: set up .venv/, then the quick benchmark report (threshold and step cost next to torch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python bench/run.py --quick "$@"
