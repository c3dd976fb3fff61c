"""``@triton.jit`` helpers shared by the attention kernels: tile loads, sparse-block walking, tails.

Every kernel walks its block lists the same way (:func:`mask_row`, :func:`listed_tiles`,
:func:`sparse_tile_start`) and loads row tiles of its (B, H, LEN, D) inputs through one loader
(:func:`tile_source`, :func:`load_rows`; :func:`load_kv` for K/V that may sit in a paged cache).

Glossary (the same letters in every kernel):
    SPARSE_BLOCK  the BlockMask's block size along the iterated axis (KV_BLOCK in the forward pass)
    BLOCK         the kernel's tile along that axis; divides SPARSE_BLOCK, so one listed sparse
                  block is visited as SPARSE_BLOCK // BLOCK consecutive tiles
    LEN           the sequence length along that axis (Q_LEN or KV_LEN)
    MASK_ROWS     rows per head of a BlockMask table: the blocks of the other axis (NQ for the kv lists)
    MASK_COLS     entries per row of an indices table (NKV for the kv lists)
"""

from __future__ import annotations

import triton
import triton.language as tl

import flexattn.kernels.interpreter  # noqa: F401  (lets the interpreter run these loops on CPU)


@triton.jit
def mask_row(b, h, row_block, MASK_H, MASK_ROWS, MASK_PER_BATCH: tl.constexpr, MASK_PER_HEAD: tl.constexpr):
    """Offset (int64) of head (b, h)'s ``row_block``-th row in a BlockMask's counts (MB, MASK_H, MASK_ROWS).

    MB is B or 1 (MASK_PER_BATCH 1 or 0), MASK_H is H or 1 (MASK_PER_HEAD 1 or 0): a broadcast dim
    has stride 0. The row's indices start ``MASK_COLS`` times further into the indices table
    (:func:`listed_blocks`).
    """
    bh = b * (MASK_PER_BATCH * MASK_H) + h * MASK_PER_HEAD
    return bh.to(tl.int64) * MASK_ROWS + row_block


# fmt: off
@triton.jit
def listed_blocks(NUM, IDX, FULL_NUM, FULL_IDX, row, MASK_COLS, FULL: tl.constexpr,
                  TILES_PER_BLOCK: tl.constexpr = 1):  # fmt: on
    """``(indices, count)`` of one mask row's list of class FULL: partial blocks (NUM, IDX) or full
    ones (FULL_NUM, FULL_IDX). ``indices`` points at the row's sorted block indices; ``count`` is how
    many are listed, times TILES_PER_BLOCK (:func:`listed_tiles` counts tiles); ``row`` is
    :func:`mask_row`'s offset."""
    if FULL:
        num, idx = FULL_NUM, FULL_IDX
    else:
        num, idx = NUM, IDX
    count = tl.load(num + row) * TILES_PER_BLOCK
    return idx + row * MASK_COLS, count


# fmt: off
@triton.jit
def listed_tiles(NUM, IDX, FULL_NUM, FULL_IDX, row, MASK_COLS, FULL: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: on
    """``(indices, num_tiles)``: :func:`listed_blocks` counting BLOCK-wide tiles, the bound of the
    loop that visits them through :func:`sparse_tile_start`::

        indices, num_tiles = listed_tiles(NUM, IDX, FULL_NUM, FULL_IDX, row, COLS, full, SPARSE_BLOCK, BLOCK)
        for tile in range(0, num_tiles):
            start = sparse_tile_start(indices, tile, 1, SPARSE_BLOCK, BLOCK)
    """
    return listed_blocks(NUM, IDX, FULL_NUM, FULL_IDX, row, MASK_COLS, FULL, SPARSE_BLOCK // BLOCK)


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
def clamp_tail(index, LEN, CHECK: tl.constexpr = True):
    """Positions as the mods see them: ``index`` (>= 0) with the tail past ``LEN`` (>= 1) held at
    ``LEN - 1``, so the mods' gathers stay in bounds on a tile that overhangs the sequence.

    A tail position's scores are dropped (``mask_tail``), so any in-range stand-in serves; a minimum
    is one instruction where the earlier modulo was an integer division per position. Only where
    CHECK says a tile can overhang LEN; otherwise every position is in range and nothing is done.
    """
    if CHECK:
        index = tl.minimum(index, LEN - 1)
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



@triton.jit
def tile_source(T, b, h, strides, USE_TMA: tl.constexpr):
    """What :func:`load_rows` reads head (b, h) of a (B, H, LEN, D) tensor ``T`` from: ``T`` itself
    when it is a tensor descriptor (USE_TMA), else the pointer at the head (``strides``: batch, head, ...)."""
    if USE_TMA:
        src = T
    else:
        src = T + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1]
    return src


# fmt: off
@triton.jit
def load_rows(src, b, h, start, strides, LEN, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
              CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, TRANSPOSED: tl.constexpr = False):  # fmt: on
    """Rows ``[start, start + BLOCK)`` of head (b, h) of a (B, H, LEN, D) tensor (q, k, v, dO, ...):
    the (BLOCK, D_PAD) tile, or with TRANSPOSED its (D_PAD, BLOCK) transpose; zero beyond D and, with
    CHECK_ROWS (or TMA), beyond LEN.

    ``src`` comes from :func:`tile_source`: with USE_TMA a 4-D tensor descriptor whose zero padding
    does the bounds checks (a transposed tile is loaded, then transposed); otherwise the pointer at
    head (b, h) with ``strides`` (position, feature), and a transposed tile is read in transposed
    order (features along rows), with no layout conversion of a loaded tile.
    """
    if USE_TMA:
        tile = src.load([b, h, start, 0]).reshape(BLOCK, D_PAD)
        if TRANSPOSED:
            tile = tl.trans(tile)
    else:
        base = src + start.to(tl.int64) * strides[0]
        if TRANSPOSED:
            tile = load_tile(base, tl.arange(0, D_PAD), tl.arange(0, BLOCK), strides[1], strides[0], D, LEN - start,
                             D != D_PAD, CHECK_ROWS)
        else:
            tile = load_tile(base, tl.arange(0, BLOCK), tl.arange(0, D_PAD), strides[0], strides[1], LEN - start, D,
                             CHECK_ROWS, D != D_PAD)
    return tile


# fmt: off
@triton.jit
def paged_rows(pages, start, LEN, BLOCK: tl.constexpr, CHECK_ROWS: tl.constexpr, PAGE: tl.constexpr):  # fmt: on
    """Where the *logical* rows ``[start, start + BLOCK)`` of a paged K/V cache live: computed once per
    tile and shared by its K and V loads (:func:`load_kv`).

    Logical row r is physical row ``pages[r // PAGE] * PAGE + r % PAGE``; ``pages`` points at the
    sequence's page-table row (int32, -1 where no page is reserved: those rows read page 0 and must
    be kept out of the softmax by the caller, as the converted block mask does). Returns the first
    physical row (a scalar) when the tile sits in one page (PAGE a multiple of BLOCK; tiles start at
    multiples of BLOCK), else the (BLOCK,) physical rows; ``start`` itself when PAGE == 0 (contiguous).
    """
    if PAGE == 0:
        rows = start
    elif PAGE % BLOCK == 0:
        page = tl.load(pages + tl.minimum(start, LEN - 1) // PAGE)  # (start may pass LEN in a tail block)
        rows = tl.maximum(page, 0) * PAGE + start % PAGE
    else:
        logical = start + tl.arange(0, BLOCK)
        if CHECK_ROWS:
            page = tl.load(pages + logical // PAGE, mask=logical < LEN, other=0)
        else:
            page = tl.load(pages + logical // PAGE)
        rows = tl.maximum(page, 0) * PAGE + logical % PAGE
    return rows


# fmt: off
@triton.jit
def load_kv(src, rows, b, hk, start, strides, LEN, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
            CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, PAGE: tl.constexpr):  # fmt: on
    """The (BLOCK, D_PAD) K or V tile of logical rows ``[start, start + BLOCK)`` from either source,
    zero beyond LEN (with CHECK_ROWS) and D.

    PAGE == 0: contiguous, :func:`load_rows` (``rows`` unused). PAGE > 0: a paged cache
    (1, HKV, N_PAGES * PAGE, D) at the physical ``rows`` from :func:`paged_rows`; ``src`` points at head
    hk of the cache with ``strides`` (position, feature), or with USE_TMA is a descriptor over the whole
    cache (only for tiles inside one page; its rows past LEN come from the page and are not zeroed:
    the caller masks their scores, and their values meet p = 0). A tile spanning pages loads per-row
    addresses.
    """
    if PAGE == 0:
        tile = load_rows(src, b, hk, start, strides, LEN, D, D_PAD, BLOCK, CHECK_ROWS, USE_TMA)
    elif PAGE % BLOCK == 0:
        if USE_TMA:
            tile = src.load([0, hk, rows, 0]).reshape(BLOCK, D_PAD)
        else:
            tile = load_tile(src + rows.to(tl.int64) * strides[0], tl.arange(0, BLOCK), tl.arange(0, D_PAD),
                             strides[0], strides[1], LEN - start, D, CHECK_ROWS, D != D_PAD)
    else:
        logical = start + tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        # int32 offsets within the head (PagedKV.check guarantees they fit): a quarter fewer
        # instructions in the loop than int64 ones, and no spills, at pages of 16 on sm_90a
        ptrs = src + (rows[:, None] * strides[0] + cols[None, :] * strides[1])
        if CHECK_ROWS and D != D_PAD:
            tile = tl.load(ptrs, mask=(logical[:, None] < LEN) & (cols[None, :] < D), other=0.0)
        elif CHECK_ROWS:
            tile = tl.load(ptrs, mask=logical[:, None] < LEN, other=0.0)
        elif D != D_PAD:
            tile = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


# fmt: off
@triton.jit
def load_paged_kv_tile(src, pages, hk, start, strides, LEN, D: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr,
                       PAGE: tl.constexpr):  # fmt: on
    """:func:`load_rows` for a paged K/V cache in one call (``pages``: the sequence's page-table row):
    :func:`paged_rows`, then :func:`load_kv`. Kernels loading K and V of one tile share the rows
    instead."""
    rows = paged_rows(pages, start, LEN, BLOCK, CHECK_ROWS, PAGE)
    return load_kv(src, rows, 0, hk, start, strides, LEN, D, D_PAD, BLOCK, CHECK_ROWS, USE_TMA, PAGE)
