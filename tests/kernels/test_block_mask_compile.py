"""The device builder's kernels compile for Hopper (sm_90a) on a machine without a GPU.

The interpreter accepts some programs the GPU compiler rejects (and the other way round); this
compiles the classifier for the masks the benchmark times and the q side's two kernels once (they do
not depend on the mod), with the stub driver of benchmarks/compile_report.py, and checks they fit
without spills. It also bounds the first-call cost the issue cares about: trace + code generation +
Triton compile of the classifier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, "benchmarks")
import compile_report as cr
import flexattn.compiler as C
from flexattn import variants as V
from flexattn.kernels.block_mask_kernel import build_block_tables, build_q_side
ids = torch.stack([V.document_ids_from_lengths(torch.tensor([1000, 3000, 4192])) for _ in range(2)])
mods = {"causal": V.causal(), "document_causal": V.document_mask(ids, V.causal()),
        "sliding_window": V.sliding_window(1024), "prefix_lm_per_batch": V.prefix_lm(torch.tensor([10, 20])),
        "float_band": lambda b, h, q, kv: torch.floor((q - kv).float() / 3.0) * 0.5 + torch.rand(4)[h] <= 7.0}
rows = []
for name, mod in mods.items():
    compiled = []
    start = time.time()
    with cr.compile_only(compiled):
        block_mod = C.compile_block_mask_mod(mod, device="cpu", target="cuda")
        tables = build_block_tables(block_mod, 2, 1, 8192, 8192, 128, 128, torch.device("cpu"))
        if not rows:  # the q side's kernels do not depend on the mod: compiled once
            build_q_side(tables)
    seconds = time.time() - start
    rows += [dict(mod=name, kernel=k, seconds=seconds, **cr.resources(kernel)) for k, kernel in compiled]
print("ROWS=" + json.dumps(rows))
"""


def test_classifier_and_transpose_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROWS="))[5:])
    assert {(r["mod"], r["kernel"]) for r in rows} == {
        (m, "_classify_kernel")
        for m in ("causal", "document_causal", "sliding_window", "prefix_lm_per_batch", "float_band")
    } | {("causal", "_classes_kernel"), ("causal", "_transpose_kernel")}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["spill_stores"] == 0, row
