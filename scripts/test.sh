#!/usr/bin/env bash
# Run the test suite on CPU. Kernels run through Triton's interpreter (TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k block_mask`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q -m "not gpu" -n "${FLEXATTN_TEST_WORKERS:-2}" "$@"
