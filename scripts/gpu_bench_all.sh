#!/usr/bin/env bash
# The session's GPU verification in two stages that each fit one device call (<= 10 minutes), logs
# under $OUT. Run them back to back on one warm machine:
#   bash scripts/gpu_bench_all.sh kernels   # CPU fast path on this torch, every GPU test, Gluon forward, biases
#   bash scripts/gpu_bench_all.sh serving   # decode, paged, host path, block masks, generate, HF models, GPT example
#   bash scripts/gpu_bench_all.sh long      # generation over long caches, the host path at full length
#   bash scripts/gpu_bench_all.sh decide    # the open targets' side-by-side rows (#11 before/after, #12 masks)
# Every stage is time-limited so one slow stage cannot eat the others; each prints its table's tail.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
O=${OUT:-/tmp/final}; mkdir -p "$O"
stage=${1:-kernels}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "$stage" = kernels ]; then
    timeout 200 python3 -m pytest -v -p no:cacheprovider -n 12 -m gpu tests > "$O/gpu_tests.log" 2>&1
    grep -E "(FAILED|ERROR) tests/" "$O/gpu_tests.log" | cut -c1-220; tail -1 "$O/gpu_tests.log"  # -v: results as they land
    timeout 60 python3 -m pytest -q -x -p no:cacheprovider -n 12 tests/test_cpu_fast_path.py tests/test_cpu_compile.py \
        > "$O/cpu_path.log" 2>&1; tail -1 "$O/cpu_path.log"  # the CPU engines on this machine's torch
    timeout 230 python3 benchmarks/spike_gluon_forward.py --skip-tests --watchdog 225 --json "$O/gluon.json" \
        > "$O/gluon.log" 2>&1; grep -E "TFLOP|FAIL|WRONG|gluon|cudnn|triton|torch" "$O/gluon.log" | cut -c1-150 | tail -40
    timeout 110 python3 benchmarks/bench_attention.py --backward --head-dims 128 \
        --variants alibi rel_bias_learned rel_bias_learned_det head_bias_learned --json "$O/bias.json" > "$O/bias.log" 2>&1
    grep -E "ratio|FAILED|TFLOP|rel_bias|head_bias|alibi" "$O/bias.log" | cut -c1-220 | tail -16
elif [ "$stage" = serving ]; then
    timeout 130 python3 benchmarks/bench_decode.py --no-sweep --json "$O/decode.json" > "$O/decode.log" 2>&1
    cut -c1-200 "$O/decode.log" | tail -36
    timeout 40 python3 benchmarks/bench_decode.py --rows "KV 8k Lq8 " --sweep-q-lens 8 --json "$O/decode_sweep.json" \
        > "$O/decode_sweep.log" 2>&1; tail -12 "$O/decode_sweep.log" | cut -c1-200
    timeout 60 python3 benchmarks/bench_paged.py --quick --json "$O/paged.json" > "$O/paged.log" 2>&1
    tail -16 "$O/paged.log" | cut -c1-200
    timeout 25 python3 benchmarks/bench_host.py --quick --json "$O/host.json" > "$O/host.log" 2>&1; tail -12 "$O/host.log" | cut -c1-200
    timeout 15 python3 benchmarks/bench_host.py --breakdown decode-8k --top 25 > "$O/host_breakdown.log" 2>&1
    timeout 100 python3 benchmarks/bench_block_mask.py --batch 1 --rep-seconds 1 --json "$O/block_mask.json" \
        > "$O/block_mask.log" 2>&1; tail -22 "$O/block_mask.log" | cut -c1-220
    timeout 90 python3 examples/generate.py --new-tokens 64 --json "$O/generate.json" > "$O/generate.log" 2>&1
    tail -14 "$O/generate.log" | cut -c1-220
    timeout 60 python3 benchmarks/bench_transformers.py --models llama gemma2 --steps 5 --warmup 2 --new-tokens 8 \
        --json "$O/hf.json" > "$O/hf.log" 2>&1; tail -9 "$O/hf.log" | cut -c1-220
    timeout 45 python3 examples/train_gpt_packed.py --steps 30 > "$O/e2e.log" 2>&1; tail -2 "$O/e2e.log" | cut -c1-400
elif [ "$stage" = long ]; then
    # long caches, where decode attention is a large part of a step (issue #13's generate target)
    timeout 300 python3 examples/generate.py --new-tokens 32 --prompt-lengths 4096-16384 --batch 8 \
        --json "$O/generate_long.json" > "$O/generate_long.log" 2>&1; tail -14 "$O/generate_long.log" | cut -c1-220
    timeout 60 python3 benchmarks/bench_host.py --json "$O/host_full.json" > "$O/host_full.log" 2>&1
    tail -8 "$O/host_full.log" | cut -c1-200  # the full 5 x 500 calls, fused-merge column included
elif [ "$stage" = decide ]; then
    # issue #11: no row >2% slower than the tree before the redesign (carry .old: git archive 42fede2)
    timeout 420 python3 benchmarks/before_after.py --before .old/base --rounds 6 --json "$O/before_after.json" \
        > "$O/before_after.log" 2>&1; tail -18 "$O/before_after.log" | cut -c1-220
    # issue #12: prefix-LM and document masks next to torch's compiled builder, B1 and B8
    timeout 170 python3 benchmarks/bench_block_mask.py --masks prefix_lm document --sizes 8k 32k 128k --batch 1 8 \
        --builders flexattn torch-compiled --rep-seconds 1 \
        --json "$O/block_mask_decide.json" > "$O/block_mask_decide.log" 2>&1; tail -16 "$O/block_mask_decide.log" | cut -c1-220
else
    echo "stage must be kernels, serving, long or decide, got $stage"; exit 2
fi
