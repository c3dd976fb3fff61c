"""Interval analysis of mask mods (compiler/intervals.py): sound on any tile, and sharp on the
common masks (a tile it leaves undecided is really partial).

The generated interval function runs in a small test kernel (through Triton's interpreter on CPU)
over random tiles; a dense mask from create_mask is the brute-force answer.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings

from flexattn import create_mask
from flexattn import variants as V
from flexattn.compiler import compile_block_mask_mod
from flexattn.compiler.range_tables import range_table
from tests.catalog import MASK_MODS
from tests.mask_exprs import make_mod, mask_exprs

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="interval functions are Triton code: needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
T = 16  # kv tiles per q tile in the test kernel


@triton.jit
def _bounds_kernel(
    LO, HI, BH, Q_RANGE, KV_RANGE, MASK_ARGS, INTERVAL_FN: tl.constexpr, RANGES, T: tl.constexpr
):
    """Program i: tile rows (b, h, [q_lo, q_hi]) x T kv ranges -> int64 bounds of the mask."""
    i = tl.program_id(0)
    b, h = tl.load(BH + 2 * i), tl.load(BH + 2 * i + 1)
    q_lo, q_hi = tl.load(Q_RANGE + 2 * i), tl.load(Q_RANGE + 2 * i + 1)
    offs = i * T + tl.arange(0, T)
    kv_lo, kv_hi = tl.load(KV_RANGE + 2 * offs), tl.load(KV_RANGE + 2 * offs + 1)
    lo, hi = INTERVAL_FN(b, h, q_lo, q_hi, kv_lo, kv_hi, MASK_ARGS, RANGES)
    tl.store(LO + offs, lo)
    tl.store(HI + offs, hi)


def tile_bounds(mask_mod, bh, q_range, kv_range, grain=1):
    """Bounds for tiles: bh (n, 2), q_range (n, 2), kv_range (n, T, 2) int32 -> lo, hi (n, T)."""
    mod = compile_block_mask_mod(mask_mod, device=DEVICE, grain=grain)
    n = bh.shape[0]
    lo = torch.empty(n, T, dtype=torch.int64, device=DEVICE)
    hi = torch.empty_like(lo)
    _bounds_kernel[(n,)](lo, hi, bh, q_range, kv_range, mod.mask.args, mod.interval_fn, mod.ranges, T=T)
    return lo, hi


def random_tiles(n, B, H, Lq, Lkv):
    def ranges(count, length):
        a, b = torch.randint(0, length, (2, count), dtype=torch.int32)
        return torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1)

    bh = torch.stack([torch.randint(0, B, (n,)), torch.randint(0, H, (n,))], -1).to(torch.int32)
    return bh, ranges(n, Lq), ranges(n * T, Lkv).view(n, T, 2)


def assert_sound(mask_mod, B, H, Lq, Lkv, n=24, grain=1):
    """Where the bounds say all True / all False, the dense mask agrees on every pair of the tile."""
    dense = create_mask(mask_mod, B, H, Lq, Lkv, device="cpu")
    dense = dense.expand(B, H, Lq, Lkv)
    bh, q_range, kv_range = random_tiles(n, B, H, Lq, Lkv)
    lo, hi = (t.cpu() for t in tile_bounds(mask_mod, *(x.to(DEVICE) for x in (bh, q_range, kv_range)), grain))
    assert bool(((lo == 0) | (lo == 1)).all() & ((hi == 0) | (hi == 1)).all() & (lo <= hi).all())
    for i in range(n):
        (b, h), (q0, q1) = bh[i].tolist(), q_range[i].tolist()
        for j in range(T):
            k0, k1 = kv_range[i, j].tolist()
            tile = dense[b, h, q0 : q1 + 1, k0 : k1 + 1]
            if lo[i, j] == 1:
                assert bool(tile.all()), f"said full: b={b} h={h} q=[{q0},{q1}] kv=[{k0},{k1}]"
            if hi[i, j] == 0:
                assert not bool(tile.any()), f"said empty: b={b} h={h} q=[{q0},{q1}] kv=[{k0},{k1}]"


@pytest.mark.parametrize("entry", list(MASK_MODS), ids=list(MASK_MODS))
def test_catalog_bounds_are_sound_on_random_tiles(entry):
    B, H, Lq, Lkv = 2, 3, 45, 61
    assert_sound(MASK_MODS[entry](B, H, Lq, Lkv, DEVICE), B, H, Lq, Lkv, grain=int(torch.randint(1, 5, ())))


def _docs(lengths):
    return V.document_ids_from_lengths(torch.tensor(lengths)).to(DEVICE)


SHARP = {
    "causal": lambda L: V.causal(),
    "sliding-window": lambda L: V.sliding_window(10),
    "prefix-lm": lambda L: V.prefix_lm(12),
    "chunked-causal": lambda L: V.chunked(16, causal=True),
    "document": lambda L: V.document_mask(_docs([7, 1, 20, 13, 23])),
    # inside a tile spanning documents the analysis cannot relate q and kv: aligned documents here
    "document-causal": lambda L: V.document_mask(_docs([8, 16, 24, 16]), V.causal()),
    "float-chunks": lambda L: lambda b, h, q, kv: torch.floor(q.float() / 16) == torch.floor(kv.float() / 16),
    "float-band": lambda L: lambda b, h, q, kv: (q - kv).float() * 0.125 <= 2.0,
}


@pytest.mark.parametrize("name", list(SHARP), ids=list(SHARP))
def test_common_masks_leave_only_partial_tiles_undecided(name):
    """Block-aligned 8x8 tiles: undecided exactly where the tile holds both True and False pairs."""
    L, blk = 64, 8
    mask_mod = SHARP[name](L)
    dense = create_mask(mask_mod, 1, 1, L, L, device="cpu")[0, 0]
    n = L // blk
    starts = torch.arange(n, dtype=torch.int32) * blk
    block_range = torch.stack([starts, starts + blk - 1], -1)
    bh = torch.zeros(n, 2, dtype=torch.int32)
    kv_range = block_range[torch.arange(T) % n].expand(n, T, 2).contiguous()  # row i: kv blocks 0..n-1, ...
    lo, hi = (
        t.cpu() for t in tile_bounds(mask_mod, bh.to(DEVICE), block_range.to(DEVICE), kv_range.to(DEVICE), 8)
    )
    tiles = dense.view(n, blk, n, blk).transpose(1, 2)
    partial = tiles.any(-1).any(-1) & ~tiles.all(-1).all(-1)
    undecided = (lo == 0) & (hi == 1)
    assert torch.equal(undecided[:, :n], partial)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float32])
@pytest.mark.parametrize("n,grain", [(1, 1), (37, 1), (37, 4), (64, 8), (100, 64)])
def test_range_tables_answer_every_grain_range_exactly(n, grain, dtype):
    rows = torch.randint(-50, 50, (3, n)).to(dtype)
    tmin, tmax, lg = range_table(rows, grain)
    nb = -(-n // grain)
    padded = torch.cat([rows, rows[:, -1:].expand(3, nb * grain - n)], 1).view(3, nb, grain)
    for a in range(nb):
        for c in range(a, nb):
            k = int(lg[c - a + 1])
            second = c - (1 << k) + 1
            got_min = torch.minimum(tmin[k, :, a], tmin[k, :, second])
            got_max = torch.maximum(tmax[k, :, a], tmax[k, :, second])
            assert torch.equal(got_min, padded[:, a : c + 1].amin((1, 2)).to(got_min.dtype))
            assert torch.equal(got_max, padded[:, a : c + 1].amax((1, 2)).to(got_max.dtype))


# ---- property: random mask expressions ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(max_examples=30, deadline=None)
@given(expr=mask_exprs())
def test_random_mask_expressions_are_sound(expr):
    assert_sound(make_mod(expr), 2, 2, 23, 29, n=6, grain=2)
