#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements into it. Sourced by quickstart.sh and test.sh.
# torch/torchvision are pinned to the builds the project machines install offline.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="${1:-requirements.txt}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  python3 -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.installed-$(sha1sum "$ROOT/$REQ" "$ROOT/requirements.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/$REQ"
  touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
