"""The mod calling convention with per-row head indices (issue #11).

A decode kernel packs the query heads of a GQA group (and several query tokens) into the rows of
one tile, so the generated device functions receive ``h`` (and ``b``) as int32 ``[BLOCK_M, 1]``
vectors instead of scalars (kernels/mods.py). Generated code is elementwise and broadcasting, so
this must give, element by element, what the mod gives eagerly with that row's head.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from flexattn.compiler import compile_mask_mod, compile_score_mod

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)

M, N, HEADS, L = 16, 16, 4, 40


@triton.jit
def _row_heads_score(out_ptr, score_ptr, h_ptr, q_ptr, kv_ptr, caps, FN: tl.constexpr,
                     M: tl.constexpr, N: tl.constexpr):  # fmt: skip
    rows = tl.arange(0, M)[:, None]
    cols = tl.arange(0, N)[None, :]
    h = tl.load(h_ptr + rows)  # [M, 1]: one query head per row (GQA packing)
    q_idx = tl.load(q_ptr + rows)
    kv_idx = tl.load(kv_ptr + cols)
    score = tl.load(score_ptr + rows * N + cols)
    tl.store(out_ptr + rows * N + cols, FN(score, 0, h, q_idx, kv_idx, caps))


@triton.jit
def _row_heads_mask(out_ptr, h_ptr, q_ptr, kv_ptr, caps, FN: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, M)[:, None]
    cols = tl.arange(0, N)[None, :]
    h = tl.load(h_ptr + rows)
    keep = FN(0, h, tl.load(q_ptr + rows), tl.load(kv_ptr + cols), caps)
    tl.store(out_ptr + rows * N + cols, keep.to(tl.int8))


def _score_mods():
    slopes = torch.rand(HEADS)
    table = torch.randn(HEADS, 2 * L - 1)
    return {
        "alibi": lambda s, b, h, q, kv: s + slopes[h] * (kv - q),
        "relative-table": lambda s, b, h, q, kv: s + table[h, q - kv + L - 1],
        "head-dependent-softcap": lambda s, b, h, q, kv: (h + 1) * 10.0 * torch.tanh(s / ((h + 1) * 10.0)),
    }


def _rows():
    heads = torch.randint(0, HEADS, (M,), dtype=torch.int32)
    q_idx = torch.randint(0, L, (M,), dtype=torch.int32)
    kv_idx = torch.randint(0, L, (N,), dtype=torch.int32)
    return heads, q_idx, kv_idx


@pytest.mark.parametrize("name", sorted(_score_mods()))
def test_score_mod_with_a_head_per_row(name):
    mod = _score_mods()[name]
    heads, q_idx, kv_idx = _rows()
    score = torch.randn(M, N)
    kmod = compile_score_mod(mod, device="cpu")
    out = torch.empty_like(score)
    _row_heads_score[(1,)](out, score, heads, q_idx, kv_idx, kmod.args, kmod.fn, M, N)
    zero = torch.tensor(0, dtype=torch.int32)
    rows = [[mod(score[i, j], zero, heads[i], q_idx[i], kv_idx[j]) for j in range(N)] for i in range(M)]
    want = torch.stack([torch.stack(row) for row in rows])
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-5)


def test_mask_mod_with_a_head_per_row():
    windows = torch.tensor([1, 3, 8, 40])

    def per_head_window(b, h, q, kv):
        return (q >= kv) & (q - kv <= windows[h])

    heads, q_idx, kv_idx = _rows()
    kmod = compile_mask_mod(per_head_window, device="cpu")
    out = torch.empty(M, N, dtype=torch.int8)
    _row_heads_mask[(1,)](out, heads, q_idx, kv_idx, kmod.args, kmod.fn, M, N)
    zero = torch.tensor(0, dtype=torch.int32)
    want = torch.tensor(
        [[bool(per_head_window(zero, heads[i], q_idx[i], kv_idx[j])) for j in range(N)] for i in range(M)]
    )
    assert torch.equal(out.bool(), want)
