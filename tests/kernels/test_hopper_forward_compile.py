"""The Gluon Hopper forward (flexattn/kernels/hopper/forward_ws.py) compiles for sm_90a without a GPU.

CI has no Hopper GPU, so this checks what can be checked statically: the kernel compiles through
Triton's Gluon frontend for sm_90a (the stub driver of benchmarks/compile_report.py), fits in
registers without spills and in shared memory, and uses the Hopper paths it was written for:
wgmma (SASS HGMMA), TMA loads (UTMALDG) and register reallocation between producer and consumers
(setmaxnreg). Correctness and speed are measured on the GPU (benchmarks/spike_gluon_forward.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexattn.kernels.hopper.forward_ws import flash_forward_ws

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED_MEMORY = 232448  # opt-in shared memory per block on sm_90
_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import gluon_compile_report as g
from compile_report import resources
rows = {}
cases = (("E128-2wg", 128, True, (64, 128, 2, True, 2)), ("E64-3wg", 64, False, (64, 128, 3, True, 3)))
for name, head_dim, causal, variant in cases:
    kernel = g.compile_variant(head_dim, causal, variant)
    rows[name] = {**resources(kernel), **g.instructions(kernel)}
print("ROWS=" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled_rows() -> dict:
    """Causal E128 with two consumer warpgroups and noop E64 with three, compiled for sm_90a."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(
        next(x for x in done.stdout.splitlines() if x.startswith("ROWS=")).removeprefix("ROWS=")
    )


@pytest.mark.parametrize("name", ["E128-2wg", "E64-3wg"])
def test_compiles_for_sm90a_with_wgmma_tma_and_setmaxnreg(compiled_rows, name):
    row = compiled_rows[name]
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    assert 0 < row["shared_memory"] <= H100_SHARED_MEMORY, row
    assert row["ptx_wgmma"] > 0 and row["sass"].get("HGMMA", 0) > 0, row
    assert row["ptx_tma_loads"] > 0 and row["sass"].get("UTMALDG", 0) > 0, row
    assert ["dec", "24"] in row["ptx_setmaxnreg"] and row["sass"].get("USETMAXREG", 0) > 0, row
    assert row["sass"].get("LDL", 0) == 0 and row["sass"].get("STL", 0) == 0, row


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((1, 2, 300, 64), torch.bfloat16, "multiple of"),
        ((1, 2, 256, 96), torch.bfloat16, "head dim 96"),
        ((1, 2, 256, 64), torch.float32, "bf16 or fp16"),
    ],
    ids=["L300", "E96", "fp32"],
)
def test_launcher_refuses_what_the_kernel_cannot_do(shape, dtype, message):
    q = torch.randn(shape).to(dtype)
    with pytest.raises(ValueError, match=message):
        flash_forward_ws(q, q, q)
