"""tile_io.load_paged_kv_tile: the paged counterpart of load_rows for K/V (what the
decode kernel calls), tile by tile against the gathered cache."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.tile_io import load_paged_kv_tile

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)


# fmt: off
@triton.jit
def _load_tiles(CACHE, PAGES, OUT, page_stride, stride_h, stride_row, stride_col, LEN,
                D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, CHECK_ROWS: tl.constexpr,
                PAGE: tl.constexpr):  # fmt: on
    """Program (t, hk, b) writes tile t of sequence b, head hk into OUT (B, HKV, TILES * BLOCK, D_PAD)."""
    t, hk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    src = CACHE + hk.to(tl.int64) * stride_h
    tile = load_paged_kv_tile(src, PAGES + b * page_stride, hk, t * BLOCK, (stride_row, stride_col), LEN, D,
                              D_PAD, BLOCK, CHECK_ROWS, False, PAGE)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    n_rows = tl.num_programs(0) * BLOCK
    out = OUT + ((b * tl.num_programs(1) + hk) * n_rows).to(tl.int64) * D_PAD
    tl.store(out + rows[:, None] * D_PAD + tl.arange(0, D_PAD)[None, :], tile)


CASES = [(16, 16, 64), (16, 64, 64), (32, 16, 70), (64, 32, 200), (64, 64, 100), (48, 32, 150)]


@pytest.mark.parametrize("page,block,length", CASES, ids=[f"page{p}-BLOCK{b}-L{n}" for p, b, n in CASES])
def test_paged_tile_equals_the_gathered_rows(page, block, length):
    B, Hkv, D, D_PAD = 2, 2, 24, 32
    max_pages = -(-length // page)
    n_pages = B * max_pages + 2
    table = torch.randperm(n_pages)[: B * max_pages].reshape(B, max_pages).to(torch.int32)
    cache = torch.randn(1, Hkv, n_pages * page, D)
    tiles = -(-length // block)
    out = torch.full((B, Hkv, tiles * block, D_PAD), float("nan"))
    _load_tiles[(tiles, Hkv, B)](
        cache, table, out, table.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), length,
        D=D, D_PAD=D_PAD, BLOCK=block, CHECK_ROWS=length % block != 0, PAGE=page,
    )  # fmt: skip
    want = torch.zeros_like(out)
    want[:, :, :length, :D] = PagedKV(table, page, length).gather(cache)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
