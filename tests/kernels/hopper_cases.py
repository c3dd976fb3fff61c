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

from flexattn import flex_attention
from flexattn import variants as V
from tests.helpers import Shape, assert_close_to_gold, gold_and_eager

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


def assert_gradients_match(q, k, v, shape: Shape, score_mod, mask, options: dict, baseline: dict) -> None:
    """dq, dk, dv of flex_attention with ``options`` against the float64 reference (the three-way rule)
    and against the same call with ``baseline`` options (max difference under 5% of the baseline's
    largest gradient). q, k, v require grad; GQA as ``shape`` says."""
    dout = torch.randn_like(q)
    grads = []
    for kernel_options in (options, baseline):
        out = flex_attention(
            q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True, kernel_options=kernel_options
        )
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert_reference_gradients(grads[0], q, k, v, shape, score_mod, mask, dout)
    for name, got, want in zip(("dq", "dk", "dv"), *grads):
        diff = (got.float() - want.float()).abs().max().item()
        assert diff < 5e-2 * want.float().abs().max().item(), (name, diff)


def assert_reference_gradients(grads, q, k, v, shape: Shape, score_mod, mask, dout) -> None:
    """(dq, dk, dv) against the float64 reference's by the three-way rule (the reference runs on
    repeated kv heads, whose gradients are summed back per group)."""
    group = shape.Hq // shape.hkv
    kr, vr = (t.detach().repeat_interleave(group, 1).requires_grad_() for t in (k, v))
    gold, eager = gold_and_eager(q, kr, vr, score_mod=score_mod, block_mask=mask, dout=dout)
    for i, name in enumerate(("dq", "dk", "dv")):
        g, e = gold.grads[i], eager.grads[i]
        if i:
            g, e = (t.unflatten(1, (shape.hkv, group)).sum(2) for t in (g, e))
        assert_close_to_gold(grads[i], g, e, name=name)
