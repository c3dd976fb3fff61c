"""benchmarks/compile_report.py: the kernels compiled for sm_90a on a machine without a GPU.

Besides checking that the tool works, this guards a static property of the generated code (not a
timing): the dK/dV kernel's full-block loop at head dim 64 stays near the ~330 SASS instructions per
step it has now. Masked loads of the per-row LSE/DELTA vectors once doubled it (BENCHMARKS.md,
"Backward rework"); a change that brings such overhead back fails here before any GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DKDV_FULL_LOOP_LIMIT = 420  # instructions per loop step, head dim 64, noop (334 with Triton 3.6)


def run_report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles, no interpreter
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import compile_report; "
        f"print('ROWS=' + json.dumps(compile_report.main({list(args)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROWS="))
    return json.loads(line.removeprefix("ROWS="))


def test_backward_kernels_compile_for_hopper_with_a_lean_dkdv_loop():
    rows = {row["kernel"]: row for row in run_report("--head-dim", "64")}
    assert set(rows) == {"_bwd_preprocess", "_bwd_dkdv", "_bwd_dq"}
    for row in rows.values():
        assert 0 < row["registers"] <= 255 and row["shared_memory"] > 0
    dkdv_loops = rows["_bwd_dkdv"]["loops"]
    assert len(dkdv_loops) == 2  # partial blocks, then full blocks
    assert dkdv_loops[1]["instructions"] <= DKDV_FULL_LOOP_LIMIT, dkdv_loops[1]
    assert rows["_bwd_dkdv"]["registers"] <= 168  # the register cap of light score mods at E64


def test_the_decode_kernel_compiles_for_hopper_through_its_launcher():
    """The split-KV decode kernel over a causal mask with ALiBi, launched as flex_decode launches it
    (the tool's stand-in for LaunchCache.launch takes every argument the launcher passes)."""
    rows = {row["kernel"]: row for row in run_report("--pass", "decode", "--variant", "causal+alibi")}
    assert "_decode_split_kernel" in rows
    split = rows["_decode_split_kernel"]
    assert 0 < split["registers"] <= 255 and split["shared_memory"] > 0 and split["loops"]


def test_refuses_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/compile_report.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "unset TRITON_INTERPRET" in done.stderr


_SURFACE_FOR_HOPPER = """
import sys, torch
sys.path.insert(0, 'benchmarks')
import compile_report
import flexattn.compiler as mod_compiler
from tests.compiler import harness
from tests.compiler.test_surface import SURFACE, _mod

bias = torch.randn(4, 64, requires_grad=True)

def everything(score, b, h, q_idx, kv_idx):
    total = score + bias[h, q_idx - kv_idx]
    for _, body in SURFACE.values():
        total = total + _mod(body)(score, b, h, q_idx, kv_idx).float()
    return total

compiled = []
with compile_report.compile_only(compiled):
    for fast_math in (False, True):
        kmod = mod_compiler.compile_score_mod(everything, device="cpu", fast_math=fast_math, target="cuda")
        score, index = torch.randn(16, 16), torch.zeros(16, dtype=torch.int32)
        harness.run_score(kmod, score, 0, 0, index, index)
        harness.run_grad(kmod, score, 0, 0, index, index, score, (torch.zeros(4, 64),))
print('TANH=' + ','.join(str('tanh.approx' in kernel.asm['ptx']) for _, kernel in compiled))
"""


def test_the_whole_pointwise_surface_compiles_for_hopper():
    """Every op of tests/compiler/test_surface.py in one score mod and its gradient, compiled for
    sm_90a (libdevice calls, bit casts, shifts, index asserts): CI has no GPU to catch invalid code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _SURFACE_FOR_HOPPER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("TANH="))
    assert line == "TANH=False,False,True,True"  # fast_math: the hardware tanh, forward and gradient
