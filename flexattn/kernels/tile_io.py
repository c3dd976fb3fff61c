"""``@triton.jit`` helpers shared by the attention kernels: tile loads, sparse-block walking, tails.

Glossary (the same letters in every kernel):
    SPARSE_BLOCK  the BlockMask's block size along the iterated axis (KV_BLOCK in the forward pass)
    BLOCK         the kernel's tile along that axis; divides SPARSE_BLOCK, so one listed sparse
                  block is visited as SPARSE_BLOCK // BLOCK consecutive tiles
    LEN           the sequence length along that axis (Q_LEN or KV_LEN)
"""

from __future__ import annotations

import triton
import triton.language as tl

import flexattn.kernels.interpreter  # noqa: F401  (lets the interpreter run these loops on CPU)


@triton.jit
def sparse_tile_start(indices_ptr, tile, stride_index, SPARSE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First position of the ``tile``-th BLOCK-wide tile of the sparse blocks listed at ``indices_ptr``.

    ``indices_ptr`` points at one row of ``kv_indices`` (or ``q_indices``); ``tile`` counts tiles
    over the listed blocks in order, SPARSE_BLOCK // BLOCK of them per listed block.
    """
    TILES_PER_BLOCK: tl.constexpr = SPARSE_BLOCK // BLOCK
    block = tl.load(indices_ptr + (tile // TILES_PER_BLOCK) * stride_index)
    return block * SPARSE_BLOCK + (tile % TILES_PER_BLOCK) * BLOCK


@triton.jit
def wrap_index(index, LEN, CHECK: tl.constexpr = True):
    """Positions as the mods see them: wrapped into ``[0, LEN)`` so gathers stay in bounds on tails.

    Only where CHECK says a tile can overhang LEN; otherwise every position is in range and the
    (integer-division) modulo is skipped.
    """
    if CHECK:
        index = index % LEN
    return index


@triton.jit
def mask_tail(scores, kv_index, KV_LEN, CHECK: tl.constexpr):
    """Set ``scores[:, j]`` to -inf where ``kv_index[j] >= KV_LEN`` (only when CHECK; else a no-op)."""
    if CHECK:
        scores = tl.where(kv_index < KV_LEN, scores, float("-inf"))
    return scores


# fmt: off
@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, N_ROWS, N_COLS,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):  # fmt: on
    """Load ``base[rows[:, None], cols[None, :]]``; zeros where a row >= N_ROWS or a column >= N_COLS.

    The bounds checks are compiled in only where the CHECK flags ask for them, so full tiles load
    without predicates. ``rows``/``cols`` are tile-local offsets (int32); ``base`` carries the
    (int64) offset of the tile's first element.
    """
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < N_ROWS) & (cols[None, :] < N_COLS), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < N_ROWS, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile



# fmt: off
@triton.jit
def load_kv_tile(src, b, hk, start, strides, LEN, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                 CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: on
    """The (BLOCK, D_PAD) K or V tile of rows ``[start, start + BLOCK)``, zero beyond LEN and D.

    With USE_TMA, ``src`` is a 4-D tensor descriptor over (B, HKV, LEN, D) whose zero padding does
    the bounds checks; otherwise ``src`` points at head (b, hk) and ``strides`` are (position, feature).
    """
    if USE_TMA:
        tile = src.load([b, hk, start, 0]).reshape(BLOCK, D_PAD)
    else:
        tile = load_tile(src + start.to(tl.int64) * strides[0], tl.arange(0, BLOCK), tl.arange(0, D_PAD),
                         strides[0], strides[1], LEN - start, D, CHECK_ROWS, D != D_PAD)
    return tile
