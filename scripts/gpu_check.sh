#!/usr/bin/env bash
# Run every GPU test (pytest -m gpu) and then the attention benchmark, on a machine with CUDA.
#
#   scripts/gpu_check.sh                 # GPU tests + forward benchmark (both configs)
#   scripts/gpu_check.sh --quick         # GPU tests + quick benchmark (E128, 4 variants)
#   scripts/gpu_check.sh --write         # ... and refresh BENCHMARKS.md
#
# Arguments go to benchmarks/bench_attention.py. Logs (gpu_tests.log, bench.log, bench.json and a copy
# of BENCHMARKS.md) land in $OUT (or /tmp/flexattn_gpu_check).
# Exit status: non-zero when a test failed or the benchmark crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/flexattn_gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$LOGS/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$PYTHON" benchmarks/bench_attention.py --json "$LOGS/bench.json" "$@" 2>&1 | tee "$LOGS/bench.log"
bench=${PIPESTATUS[0]}
cp BENCHMARKS.md "$LOGS/" 2>/dev/null  # with --write: the refreshed file, to fetch from $OUT

echo
echo "gpu tests: $(tail -n 1 "$LOGS/gpu_tests.log")  (exit $tests)"
echo "benchmark: exit $bench (table above; JSON in $LOGS/bench.json)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
