#!/usr/bin/env bash
# The test command: install what the tests need into .venv, then run the whole pytest suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-dev.txt
python -m pytest -q "$@"
