#!/usr/bin/env bash
# Create ./.venv with flexattn installed in editable mode (CPU build of torch, pinned Triton).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q -c scripts/constraints.txt torch
fi
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
