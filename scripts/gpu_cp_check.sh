#!/usr/bin/env bash
# Context parallelism on one machine of several GPUs (NCCL), repository root:
#   1. the NCCL tests (pytest -m gpu tests/distributed/: 2, 4, 8 ranks, fp32 kernels, three-way rule),
#   2. the training example on one GPU, then sharded over every GPU (the losses should agree),
#   3. the benchmark (causal and document masks, 32k-1M tokens), its JSON after every row.
# Each stage has its own time limit; logs and JSON go under $OUT (or /tmp/flexattn_cp_check).
#
#   scripts/gpu_cp_check.sh                   # every GPU of the machine
#   GPUS=4 TEST_S=300 BENCH_S=900 scripts/gpu_cp_check.sh --schedule direct   # extra args: benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0  # NVLink SHARP multicast stays off
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-/tmp/flexattn_cp_check}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
mkdir -p "$LOGS"
status=0
timeout "${TEST_S:-600}" "$PYTHON" -m pytest -q -m gpu tests/distributed/ 2>&1 | tee "$LOGS/tests.log" || status=1
timeout "${E2E_S:-300}" "$PYTHON" examples/train_gpt_packed_cp.py --single-device --steps 20 2>&1 \
    | tee "$LOGS/e2e_single.log" || status=1
timeout "${E2E_S:-300}" "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS" \
    examples/train_gpt_packed_cp.py --steps 20 2>&1 | tee "$LOGS/e2e_cp.log" || status=1
timeout "${BENCH_S:-1200}" "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS" \
    benchmarks/bench_context_parallel.py --json "$LOGS/bench_cp_${GPUS}gpu.json" "$@" 2>&1 \
    | tee "$LOGS/bench.log" || status=1
exit $status
