#!/usr/bin/env bash
# The whole GPU verification in one command (CUDA machine, repository root):
#   1. every GPU test (pytest -m gpu, spread over workers so Triton compiles in parallel),
#   2. the side-by-side benchmark, forward and backward (benchmarks/bench_attention.py),
#   3. the end-to-end training example (examples/train_gpt_packed.py).
# Each stage has its own time limit, so one slow stage cannot eat the others' time; every stage
# writes its log (and the benchmark its JSON after every row) under $OUT (or /tmp/flexattn_gpu_check).
#
#   scripts/gpu_check.sh                      # all three stages, default limits
#   TEST_S=150 BENCH_S=300 E2E_S=90 scripts/gpu_check.sh
#   scripts/gpu_check.sh --quick              # extra arguments go to the benchmark
#
# Afterwards, on a machine with the repository: `python benchmarks/bench_attention.py --from-json
# bench.json --write` refreshes BENCHMARKS.md from the fetched JSON.
# Exit status: non-zero when a test failed or a stage crashed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/flexattn_gpu_check}
mkdir -p "$LOGS"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$LOGS/card.txt"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$LOGS/card.txt"

timeout "${TEST_S:-180}" "$PYTHON" -m pytest -v -m gpu -p no:cacheprovider -n "${GPU_TEST_WORKERS:-8}" \
    tests >"$LOGS/gpu_tests.log" 2>&1
tests=$?
grep -E "(FAILED|ERROR) tests/" "$LOGS/gpu_tests.log" | cut -c1-200  # -v: each result as it lands, so a run cut short still names its failures
timeout "${BENCH_S:-360}" "$PYTHON" benchmarks/bench_attention.py --backward --json "$LOGS/bench.json" "$@" \
    >"$LOGS/bench.log" 2>&1
bench=$?
grep -E "ratio|FAILED" "$LOGS/bench.log" | cut -c1-260
timeout "${E2E_S:-120}" "$PYTHON" examples/train_gpt_packed.py --steps "${E2E_STEPS:-100}" >"$LOGS/e2e.log" 2>&1
e2e=$?
tail -n 6 "$LOGS/e2e.log"

echo
echo "gpu tests: $(tail -n 1 "$LOGS/gpu_tests.log")  (exit $tests)"
echo "benchmark: exit $bench (rows in $LOGS/bench.json)"
echo "end-to-end example: exit $e2e"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$e2e" -eq 0 ]
