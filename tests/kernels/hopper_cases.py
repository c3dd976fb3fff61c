"""What the Gluon (sm_90) kernel tests share: the GPU marks, the named variants, and compiling a list
of cases for sm_90a in one child process (no GPU: ``benchmarks/gluon_compile_report.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexattn import variants as V
from tests.helpers import Shape

ROOT = Path(__file__).resolve().parents[2]
# a GPU test that needs an sm_90 GPU (the Gluon kernels are written for it)
SM90_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
        reason="needs an sm_90 GPU",
    ),
]


def variant(name: str, shape: Shape):
    """(score_mod, mask_mod or None) of a named variant for this shape, on the GPU."""
    L = max(shape.Lq, shape.lkv)
    return {
        "noop": (None, None),
        "causal": (None, V.causal()),
        "sliding": (None, V.sliding_window(300)),
        "document": (None, V.document_mask(torch.arange(L, device="cuda") * 7 // L)),
        "alibi": (V.alibi(shape.Hq, device="cuda"), V.causal()),
        "softcap": (V.tanh_softcap(20.0), V.causal()),
        "late-rows": (
            None,
            lambda b, h, q_idx, kv_idx: q_idx >= shape.Lq // 3,
        ),  # empty rows: out 0, lse -inf
        "nothing": (None, lambda b, h, q_idx, kv_idx: q_idx < 0),  # no block listed at all
    }[name]


def compile_in_child(script: str, cases: list) -> dict:
    """Run ``script`` (which reads the JSON cases from argv[1] and prints ``ROWS=<json>``) in a child
    process from the repository root, without Triton's interpreter: real sm_90a compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(
        next(x for x in done.stdout.splitlines() if x.startswith("ROWS=")).removeprefix("ROWS=")
    )
