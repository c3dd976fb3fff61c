#!/usr/bin/env bash
# Every GPU test, then the benchmarks of each issue (attention, decode, paged, host path, the GPT example, the
# Gluon spike), each stage time-limited, logs under $OUT. The run recorded in BENCHMARKS.md (2026-12-02).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
O=${OUT:-/tmp/final}; mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

timeout 150 python3 -m pytest -v -p no:cacheprovider -n 12 -m gpu tests > "$O/gpu_tests.log" 2>&1
grep -E "(FAILED|ERROR) tests/" "$O/gpu_tests.log" | cut -c1-220; tail -1 "$O/gpu_tests.log"  # -v: results as they land
timeout 75 python3 benchmarks/bench_attention.py --backward --head-dims 128 --json "$O/bench.json" > "$O/bench.log" 2>&1
timeout 30 python3 benchmarks/bench_attention.py --variants rel_bias_learned head_bias_learned --head-dims 128 >> "$O/bench.log" 2>&1
grep -E "ratio|FAILED" "$O/bench.log" | cut -c1-240
timeout 100 python3 benchmarks/bench_decode.py --no-sweep > "$O/decode.log" 2>&1
cut -c1-240 "$O/decode.log" | tail -32
timeout 50 python3 benchmarks/bench_paged.py --quick > "$O/paged.log" 2>&1; tail -14 "$O/paged.log" | cut -c1-200
timeout 30 python3 benchmarks/bench_host.py --quick > "$O/host.log" 2>&1; tail -10 "$O/host.log" | cut -c1-200
timeout 45 python3 examples/train_gpt_packed.py --steps 30 > "$O/e2e.log" 2>&1; tail -1 "$O/e2e.log" | cut -c1-400
timeout 35 python3 benchmarks/spike_gluon_forward.py > "$O/gluon.log" 2>&1; grep -E "TFLOP|FAIL" "$O/gluon.log" | cut -c1-110 | tail -24
