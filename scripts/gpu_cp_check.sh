#!/usr/bin/env bash
# Context parallelism on a machine of several GPUs (NCCL): the tests, the training example against
# one GPU, and the benchmark. Usage: scripts/gpu_cp_check.sh [number of GPUs, default: all]
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0  # NVLink SHARP multicast stays off
GPUS="${1:-$(nvidia-smi -L | wc -l)}"
PY=.venv/bin/python
$PY -m pytest -q -m gpu tests/distributed/
$PY examples/train_gpt_packed_cp.py --single-device --steps 20 | tail -3
$PY -m torch.distributed.run --nproc-per-node "$GPUS" examples/train_gpt_packed_cp.py --steps 20 | tail -3
$PY -m torch.distributed.run --nproc-per-node "$GPUS" benchmarks/bench_context_parallel.py --json "cp_bench_${GPUS}gpu.json"
