"""Learnable relative-position tables (diagonal gathers) and per-head biases through the backward.

The dK/dV kernel sums a relative table's gradient per diagonal of each tile and adds it once per
table entry (``compiler/diagonals.py``, ``kernels/mods.py``: TILE_GRAD_FN); tiles reaching past the
table or the sequence take the element-wise atomics. Every gradient is checked three-way against
float64 autograd of the reference backend, with lengths that are not multiples of the tiles, GQA,
``q_len != kv_len`` and masks; deterministic mode must repeat bit for bit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn.compiler import compile_score_mod, diagonals
from flexattn.compiler.trace import trace
from tests.helpers import DEFAULT_FLOOR, DTYPE_IDS, Shape, assert_close_to_gold, gold_and_eager, make_qkv

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)


def relative_table(H, Lq, Lkv, device):
    """score + table[h, kv - q + Lq - 1]: 2L-1 entries per head (every entry reachable)."""
    table = torch.randn(H, Lq + Lkv - 1, device=device)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + Lq - 1]

    return rel_bias, table


def relative_table_transposed(H, Lq, Lkv, device):
    """score + table[q - kv + Lkv - 1, h] on a (2L-1, H) table: the other sign, a strided diagonal dim."""
    table = torch.randn(Lq + Lkv - 1, H, device=device)

    def rel_bias_t(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + Lkv - 1, h]

    return rel_bias_t, table


def scaled_by_table(H, Lq, Lkv, device):
    """score * (1 + table[h, kv - q]): negative indices wrap Python-style, so tiles below the
    diagonal leave [0, n) and take the element-wise path; not additive (the gradient reads the score)."""
    table = 0.1 * torch.randn(H, Lq + Lkv, device=device)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * (1.0 + table[h, kv_idx - q_idx])

    return scaled, table


def head_bias(H, Lq, Lkv, device):
    """score + bias[h] on every other key (a bias on all keys of a row has zero gradient)."""
    bias = torch.randn(H, device=device)

    def per_head(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx % 2)

    return per_head, bias


MODS = {"rel-table": relative_table, "rel-table-t": relative_table_transposed, "rel-short": scaled_by_table,
        "head-bias": head_bias}  # fmt: skip
SHAPES = [
    Shape(B=1, Hq=2, Lq=17, E=16),
    Shape(B=2, Hq=4, Hkv=2, Lq=97, Lkv=40, E=16),
    Shape(B=1, Hq=2, Hkv=1, Lq=33, Lkv=97, E=32),
    Shape(B=1, Hq=2, Lq=128, E=16),  # whole tiles inside the table: the per-diagonal sums do the work
]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def run(name, shape: Shape, dtype, *, causal=False, options=None, seed=0):
    torch.manual_seed(seed)
    score_mod, table = MODS[name](shape.Hq, shape.Lq, shape.lkv, "cpu")
    table.requires_grad_()
    q, k, v = make_qkv(shape, dtype, "cpu", requires_grad=True)
    dout = torch.randn(shape.B, shape.Hq, shape.Lq, shape.ev).to(dtype)
    mask = None
    if causal:
        mask = create_block_mask(_causal, None, None, shape.Lq, shape.lkv, device="cpu", BLOCK_SIZE=16)
    scale = 0.8 / math.sqrt(shape.E)
    opts = {"BACKEND": "TRITON", **(options or {})}
    out = flex_attention(q, k, v, score_mod, mask, scale, shape.hkv != shape.Hq, kernel_options=opts)
    grads = torch.autograd.grad(out, (q, k, v, table), dout)
    return grads, (q, k, v, dout, score_mod, mask, scale, table)


# Every mod on every shape, causal and dense, except the dense run of the largest odd shape (GQA,
# fp16, L97/40: ~15 s each in the interpreter), whose tiles the causal run covers and more (masked,
# partial and full blocks; the dense runs of the other shapes take the unmasked path).
CASES = [
    (name, shape, causal)
    for name in sorted(MODS)
    for shape in SHAPES
    for causal in (False, True)
    if causal or shape.Lq != 97
]


@needs_kernels
@pytest.mark.parametrize(
    "name, shape, causal", CASES, ids=[f"{n}-{s.id}-{'causal' if c else 'dense'}" for n, s, c in CASES]
)
def test_table_gradients_match_float64(name, shape, causal):
    dtype = torch.float16 if shape.Lq == 97 else torch.float32
    grads, (q, k, v, dout, score_mod, mask, scale, table) = run(name, shape, dtype, causal=causal)
    gold, eager = gold_and_eager(
        q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, dout=dout, params=(table,)
    )
    for label, actual, g, e in zip(("dq", "dk", "dv", "dtable"), grads, gold.grads, eager.grads):
        assert_close_to_gold(actual, g, e, floor=DEFAULT_FLOOR[dtype], name=f"{label} ({DTYPE_IDS[dtype]})")


@needs_kernels
@pytest.mark.parametrize("name", ["rel-table", "rel-short"])
def test_deterministic_table_gradients_repeat_bitwise(name):
    shape = Shape(B=2, Hq=4, Hkv=2, Lq=128, Lkv=97, E=16)  # per-diagonal and element-wise tiles
    first, _ = run(name, shape, torch.float32, options={"deterministic": True}, seed=3)
    second, _ = run(name, shape, torch.float32, options={"deterministic": True}, seed=3)
    assert torch.equal(first[3], second[3]) and first[3].abs().sum() > 0


def test_relative_indices_are_diagonal_and_others_are_not():
    H, L = 2, 8
    table = torch.randn(H, 2 * L - 1, requires_grad=True)
    other = torch.randn(2 * L, requires_grad=True)
    cases = {
        (lambda s, b, h, q, kv: s + table[h, kv - q + L - 1]): (1, 1),
        (lambda s, b, h, q, kv: s + table[h, (L - 1) - (q - kv)]): (1, 1),
        (lambda s, b, h, q, kv: s + other[q - kv + L]): (-1, 0),
        (lambda s, b, h, q, kv: s + other[q + kv]): None,
        (lambda s, b, h, q, kv: s + other[2 * (kv - q) + L]): None,
        (lambda s, b, h, q, kv: s + table[h, kv]): None,
    }
    for mod, expected in cases.items():
        program = trace(mod, "score", "cpu")
        found = diagonals.diagonal_loads(program.graph, program.graph.live([program.output]))
        got = next(((d.sign, d.dim) for d in found.values()), None)
        assert got == expected
        assert (compile_score_mod(mod, device="cpu").tile_grad_fn is not None) == (expected is not None)
