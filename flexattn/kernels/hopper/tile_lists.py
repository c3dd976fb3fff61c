"""The tile sequence of one row of a BlockMask's lists, as the Gluon kernels walk it, and the view of
one buffer of their shared-memory rings.

``row_lists`` finds the row: ``tables`` is (counts, indices, full counts, full indices, MASK_H, ROWS,
COLS) of one side of the tables, counts (MB, MASK_H, ROWS) and indices (MB, MASK_H, ROWS, COLS), a
batch or head dim of size 1 broadcast (its PER_BATCH / PER_HEAD flag 0; ``checks.block_table_args``).

A row (one q block of the kv-side tables in the forward, one kv block of the q-side tables in the
backward) lists its partial blocks, then its full blocks; a kernel visits them in tiles of ``TILE``
positions (``SPARSE_BLOCK // TILE`` tiles per listed block). ``lists`` is the row's four pointers:
(partial count, partial indices, full count, full indices). Without a block mask (``SPARSE`` False)
the row is every tile of a ``LEN``-long axis, all full.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


# fmt: off
@gluon.jit
def ring_tile(smem, i):
    """Buffer i of a ring of TMA boxes (N, 1, 1, rows, E), as the 2-D (rows, E) tile the wgmma reads."""
    return smem.index(i).reshape([smem.shape[3], smem.shape[4]])


@gluon.jit
def row_lists(tables, b, h, row, PER_BATCH: gl.constexpr, PER_HEAD: gl.constexpr):
    """The four pointers (``lists``) of head (b, h)'s ``row``-th row of one side of the block tables."""
    NUM, IDX, FULL_NUM, FULL_IDX, MASK_H, ROWS, COLS = tables
    offset = (b * (PER_BATCH * MASK_H) + h * PER_HEAD).to(gl.int64) * ROWS + row
    return (NUM + offset, IDX + offset * COLS, FULL_NUM + offset, FULL_IDX + offset * COLS)


@gluon.jit
def tile_start(lists, pos, FULL: gl.constexpr, SPARSE: gl.constexpr, SPARSE_BLOCK: gl.constexpr,
               TILE: gl.constexpr):
    """First position of the pos-th tile of the row's partial (FULL False) or full list."""
    if SPARSE:
        idx_row = lists[3] if FULL else lists[1]
        TILES_PER_BLOCK: gl.constexpr = SPARSE_BLOCK // TILE
        block = gl.load(idx_row + pos // TILES_PER_BLOCK)
        start = block * SPARSE_BLOCK + (pos % TILES_PER_BLOCK) * TILE
    else:
        start = pos * TILE
    return start


@gluon.jit
def tile_counts(lists, LEN, SPARSE: gl.constexpr, HAS_FULL: gl.constexpr, SPARSE_BLOCK: gl.constexpr,
                TILE: gl.constexpr):
    """(partial tiles, total tiles) of the row; dense: (0, every tile of LEN positions)."""
    if SPARSE:
        TILES_PER_BLOCK: gl.constexpr = SPARSE_BLOCK // TILE
        n_partial = gl.load(lists[0]) * TILES_PER_BLOCK
        if HAS_FULL:
            n_tiles = n_partial + gl.load(lists[2]) * TILES_PER_BLOCK
        else:
            n_tiles = n_partial
    else:
        n_tiles = gl.cdiv(LEN, TILE)
        n_partial = n_tiles * 0
    return n_partial, n_tiles
# fmt: on
