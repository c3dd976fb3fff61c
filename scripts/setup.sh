#!/usr/bin/env bash
# Create ./.venv with flexattn installed in editable mode (CPU build of torch, pinned Triton).
# Idempotent and quiet: re-running reinstalls only when pyproject.toml or the constraints changed.
# Before a long install it prints one line saying so; pip's output goes to .venv/setup.log and is
# shown only if something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log

announced=
announce() {  # one progress line, before the first slow step only
    if [ -z "$announced" ]; then
        echo "scripts/setup.sh: installing $1 into ./.venv ($2)" >&2
        announced=1
    fi
}

run_pip() {
    if ! .venv/bin/python -m pip "$@" >>"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "scripts/setup.sh: 'pip $*' failed (log above, also in $LOG)" >&2
        exit 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    announce "PyTorch (CPU), Triton and flexattn" "first run, about a minute"
    "$PY" -m venv .venv
    : >"$LOG"
    run_pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
    # From pip's configured index only (on this project's machines torch==2.13.0 resolves to a
    # local CPU wheel); set PIP_INDEX_URL / PIP_EXTRA_INDEX_URL to choose another build.
    announce "PyTorch (CPU), Triton and flexattn" "first run, about a minute"
    run_pip install -q -c scripts/constraints.txt torch
fi
stamp=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.flexattn-installed 2>/dev/null)" != "$stamp" ] \
    || ! .venv/bin/python -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('flexattn', 'pytest', 'xdist')))"; then
    announce "flexattn and its dev tools" "pyproject.toml or the constraints changed; under a minute"
    run_pip install -q -c scripts/constraints.txt -e ".[dev]"
    echo "$stamp" >.venv/.flexattn-installed
fi
