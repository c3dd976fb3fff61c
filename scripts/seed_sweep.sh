#!/usr/bin/env bash
# Rerun numeric tests with many random seeds and report every failure with the seed that caused it.
# A tolerance that holds for one seed but not for another is a flaky test: derive it, don't loosen it.
#
#   scripts/seed_sweep.sh                                  # 20 seeds over the default numeric tests
#   SEEDS=200 scripts/seed_sweep.sh tests/compiler/test_codegen.py
#   SEED_LIST=713339006,5 scripts/seed_sweep.sh -k learnable  # chosen seeds; extra args go to pytest
#
# Every test runs once per seed in one pytest session (FLEXATTN_SEEDS, read by tests/conftest.py;
# ids end in -seed<s>), spread over $FLEXATTN_TEST_WORKERS workers (default 2). Reproduce a failure
# with `FLEXATTN_SEED=<s> TRITON_INTERPRET=1 python -m pytest <test id without -seed<s>>`.
# Exit status: non-zero when any test failed for any seed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
DEFAULT_TESTS=(tests/compiler/test_codegen.py tests/test_reference.py)

tests=()
extra=()
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then tests+=("$arg"); else extra+=("$arg"); fi
done
[ ${#tests[@]} -gt 0 ] || tests=("${DEFAULT_TESTS[@]}")

seeds=${SEED_LIST:-$("$PYTHON" -c "import os; print(','.join(str(int.from_bytes(os.urandom(4), 'little')) for _ in range(${SEEDS:-20})))")}
count=$(tr ',' '\n' <<<"$seeds" | grep -c .)
log=$(mktemp -t flexattn_seed_sweep.XXXXXX)
echo "seed_sweep: $count seeds over ${tests[*]} (log: $log)" >&2

workers=${FLEXATTN_TEST_WORKERS:-2}
parallel=(-n "$workers")
[ "$workers" -le 1 ] && parallel=(-p no:xdist)
start=$(date +%s)
FLEXATTN_SEEDS=$seeds TRITON_INTERPRET=1 "$PYTHON" -m pytest -q -m "not gpu" -p no:cacheprovider \
    "${parallel[@]}" "${tests[@]}" ${extra[@]+"${extra[@]}"} >"$log" 2>&1
status=$?

grep -E "^(FAILED|ERROR) " "$log" | cut -c1-220
echo "seed_sweep: $count seeds, $(tail -n 1 "$log") ($(($(date +%s) - start)) s, exit $status)"
exit $status
