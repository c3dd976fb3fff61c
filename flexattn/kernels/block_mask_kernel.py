"""Block masks built on the device: classify every tile of a mask mod, list its partial/full blocks.

Glossary:
    B, H              batch and heads of the mask (1 where it is broadcast)
    Q_LEN, KV_LEN     sequence lengths (runtime values: new lengths do not recompile)
    Q_BLOCK, KV_BLOCK the BlockMask's block sizes (runtime values)
    NQ, NKV           number of q blocks / kv blocks
    T                 kv blocks classified together (one vector step along a row of tiles);
                      in the transpose, kv blocks (columns) per program
    QS                q blocks the transpose takes per step
    SUB_M, SUB_N      the sub-tile in which an undecided block is evaluated element by element
    classes           EMPTY 0 (never visited), PARTIAL 1 (mask_mod evaluated), FULL 2 (all allowed);
                      UNDECIDED 3 only inside the classifier

Three kernels:
1. ``_classify_kernel`` (``build_block_tables``, the kv side that ``create_block_mask`` builds), one
   program per (q block, h, b): walks its row of tiles T kv blocks at a time. The mod's interval
   function (``flexattn.compiler.intervals``) decides most tiles from their index ranges alone; only
   the undecided ones run the mask mod on their elements, sub-tile by sub-tile, stopping as soon as
   both a True and a False pair are seen. Each row's partial and full block lists are written in
   ascending order as they are found (a prefix sum per step).
2. ``_classes_kernel`` and 3. ``_transpose_kernel`` (``build_q_side``, the transposed view the
   backward needs, built when first asked for): the first writes each listed block's class into a
   (B, H, NQ, NKV) int8 table (one program per row of kv lists); the second, one program per
   (T kv blocks, h, b), walks the q blocks of its columns in ascending order, QS at a time, and
   appends each to the q-side lists of the columns that visit it (a prefix sum down each column),
   sorted by construction.

Memory: ``build_block_tables`` allocates only the kv-side tables (two int32 (B, H, NQ, NKV) lists,
their counts); ``build_q_side`` the q-side tables plus the int8 class table, freed when it returns.
Never L x L, and nothing is synchronised with the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

import flexattn.kernels.interpreter  # noqa: F401  (lets the interpreter use loaded loop bounds)
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.mods import KernelMod

EMPTY, PARTIAL, FULL, UNDECIDED = 0, 1, 2, 3
KV_BLOCKS_PER_STEP = 64  # T of the classifier: fixed, so new lengths reuse the compiled kernel
COLUMNS_PER_PROGRAM = 32  # T of the transpose
Q_BLOCKS_PER_STEP = 32  # QS of the transpose
SUB_TILE_ELEMENTS = 4096
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class BlockMaskMod:
    """A mask mod compiled for building block masks (``flexattn.compiler.compile_block_mask_mod``).

    Attributes:
        mask: the element-wise mask (``MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS)``).
        interval_fn: ``@triton.jit`` ``(b, h, q_lo, q_hi, kv_lo, kv_hi, caps, ranges) -> (lo, hi)``,
            int64 bounds of the mask over tiles (see ``flexattn.compiler.intervals``).
        ranges: the runtime tuple for ``interval_fn`` (min/max tables of captured tensors).
        name: the mod's name, for errors.
    """

    mask: KernelMod
    interval_fn: Any
    ranges: tuple
    name: str = "mask_mod"


@triton.jit
def _tile_class(b, h, q_start, q_end, kv_start, kv_end, MASK_FN: tl.constexpr, MASK_ARGS,
                SUB_M: tl.constexpr, SUB_N: tl.constexpr):  # fmt: skip
    """EMPTY / PARTIAL / FULL of the tile [q_start, q_end) x [kv_start, kv_end), element by element."""
    rows = tl.arange(0, SUB_M)
    cols = tl.arange(0, SUB_N)
    n_cols = tl.cdiv(kv_end - kv_start, SUB_N)
    steps = tl.cdiv(q_end - q_start, SUB_M) * n_cols
    seen_true = tl.zeros((), tl.int32)
    seen_false = tl.zeros((), tl.int32)
    step = tl.zeros((), tl.int32)
    while (step < steps) & ((seen_true == 0) | (seen_false == 0)):
        q_pos = q_start + (step // n_cols) * SUB_M + rows
        kv_pos = kv_start + (step % n_cols) * SUB_N + cols
        inside = (q_pos < q_end)[:, None] & (kv_pos < kv_end)[None, :]
        # positions past the tile repeat its last row / column: in range for the mod's gathers
        q_idx = tl.minimum(q_pos, q_end - 1)[:, None]
        kv_idx = tl.minimum(kv_pos, kv_end - 1)[None, :]
        keep = MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS) != 0
        allowed = (keep & inside).to(tl.int32)
        denied = ((~keep) & inside).to(tl.int32)
        seen_true = tl.maximum(seen_true, tl.max(tl.max(allowed, 1), 0))
        seen_false = tl.maximum(seen_false, tl.max(tl.max(denied, 1), 0))
        step += 1
    return tl.where(seen_true == 0, 0, tl.where(seen_false == 0, 2, 1))


@triton.jit
def _append(IDX, row_base, count, blocks, selected):
    """Write ``blocks[selected]`` at ``IDX[row_base + count + rank]`` (ascending); the new count."""
    picked = selected.to(tl.int32)
    pos = count + tl.cumsum(picked, 0) - 1
    tl.store(IDX + row_base + pos, blocks, mask=selected)
    return count + tl.sum(picked, 0)


@triton.jit
def _zero_tail(IDX, row_base, count, N, T: tl.constexpr):
    """IDX[row_base + count .. row_base + N) = 0."""
    offs = tl.arange(0, T)
    for start in range(count, N, T):
        slots = start + offs
        tl.store(IDX + row_base + slots, tl.zeros((T,), tl.int32), mask=slots < N)


# Sizes change with the lengths and the block sizes: not specialized, so they never recompile.
@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "NQ", "NKV", "H", "Q_BLOCK", "KV_BLOCK"])
def _classify_kernel(
    # outputs: counts (B*H*NQ,), indices (B*H*NQ, NKV) int32
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    # sizes
    Q_LEN, KV_LEN, NQ, NKV, H, Q_BLOCK, KV_BLOCK,
    # the compiled mod
    MASK_FN: tl.constexpr, MASK_ARGS, INTERVAL_FN: tl.constexpr, RANGES,
    # meta-parameters
    T: tl.constexpr, SUB_M: tl.constexpr, SUB_N: tl.constexpr, SEPARATE_FULL: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row = (b.to(tl.int64) * H + h) * NQ + qb
    row_base = row * NKV
    q_start = qb * Q_BLOCK
    q_end = tl.minimum(q_start + Q_BLOCK, Q_LEN)
    offs = tl.arange(0, T)
    n_partial = tl.zeros((), tl.int32)
    n_full = tl.zeros((), tl.int32)
    for start in range(0, NKV, T):
        # -- decide what the index ranges decide --
        blocks = start + offs
        valid = blocks < NKV
        kv_hi = tl.minimum(blocks * KV_BLOCK + KV_BLOCK, KV_LEN) - 1
        kv_lo = tl.minimum(blocks * KV_BLOCK, kv_hi)  # lanes past NKV: a valid (unused) range
        lo, hi = INTERVAL_FN(b, h, q_start, q_end - 1, kv_lo, kv_hi, MASK_ARGS, RANGES)
        cls = tl.where(lo > 0, 2, tl.where(hi == 0, 0, 3))
        cls = tl.where(valid, cls, 0)
        # -- evaluate the undecided tiles element by element --
        for _ in range(tl.sum((cls == 3).to(tl.int32), 0)):
            t = tl.min(tl.where(cls == 3, offs, T), 0)
            kv_start = (start + t) * KV_BLOCK
            kv_end = tl.minimum(kv_start + KV_BLOCK, KV_LEN)
            found = _tile_class(b, h, q_start, q_end, kv_start, kv_end, MASK_FN, MASK_ARGS, SUB_M, SUB_N)
            cls = tl.where(offs == t, found, cls)
        if not SEPARATE_FULL:
            cls = tl.where(cls == 2, 1, cls)
        # -- record the partial and full lists in ascending order --
        n_partial = _append(KV_IDX, row_base, n_partial, blocks, cls == 1)
        if SEPARATE_FULL:
            n_full = _append(FULL_IDX, row_base, n_full, blocks, cls == 2)
    tl.store(KV_NUM + row, n_partial)
    _zero_tail(KV_IDX, row_base, n_partial, NKV, T)
    if SEPARATE_FULL:
        tl.store(FULL_NUM + row, n_full)
        _zero_tail(FULL_IDX, row_base, n_full, NKV, T)


@triton.jit(do_not_specialize=["NKV"])
def _classes_kernel(
    # inputs: counts (B*H*NQ,), indices (B*H*NQ, NKV) int32; output: classes (B*H*NQ, NKV) int8 (zeroed)
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, CLASSES,
    NKV,
    T: tl.constexpr, HAS_FULL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_base = row * NKV
    _mark(KV_IDX, CLASSES, row_base, tl.load(KV_NUM + row), NKV, 1, T)
    if HAS_FULL:
        _mark(FULL_IDX, CLASSES, row_base, tl.load(FULL_NUM + row), NKV, 2, T)


@triton.jit
def _mark(IDX, CLASSES, row_base, count, NKV, value: tl.constexpr, T: tl.constexpr):
    """CLASSES[row_base + IDX[row_base + s]] = value for the first ``count`` slots s (in range only)."""
    offs = tl.arange(0, T)
    for start in range(0, tl.minimum(count, NKV), T):
        slots = start + offs
        blocks = tl.load(IDX + row_base + slots, mask=(slots < count) & (slots < NKV), other=-1)
        listed = (blocks >= 0) & (blocks < NKV)  # out-of-range entries (a malformed mask) write nothing
        tl.store(CLASSES + row_base + blocks, tl.full((T,), value, tl.int8), mask=listed)


@triton.jit(do_not_specialize=["NQ", "NKV", "H"])
def _transpose_kernel(
    # input: classes (B*H, NQ, NKV) int8; outputs: counts (B*H, NKV), indices (B*H, NKV, NQ) int32 (zeroed)
    CLASSES, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
    NQ, NKV, H,
    T: tl.constexpr, QS: tl.constexpr, SEPARATE_FULL: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)
    cols = tl.program_id(0) * T + tl.arange(0, T)
    valid = cols < NKV
    out_rows = (bh * NKV + cols) * NQ  # start of each column's q list
    n_partial = tl.zeros((T,), tl.int32)
    n_full = tl.zeros((T,), tl.int32)
    for q0 in range(0, NQ, QS):
        # QS q blocks of T columns at once; each column appends its visitors in q order
        q_blocks = q0 + tl.arange(0, QS)
        inside = (q_blocks < NQ)[:, None] & valid[None, :]
        cls = tl.load(CLASSES + (bh * NQ + q_blocks[:, None]) * NKV + cols[None, :], mask=inside, other=0)
        rows = tl.zeros((QS, T), tl.int32) + q_blocks[:, None]
        n_partial = _append_columns(Q_IDX, out_rows, n_partial, rows, cls == 1)
        if SEPARATE_FULL:
            n_full = _append_columns(FULL_Q_IDX, out_rows, n_full, rows, cls == 2)
    tl.store(Q_NUM + bh * NKV + cols, n_partial, mask=valid)
    if SEPARATE_FULL:
        tl.store(FULL_Q_NUM + bh * NKV + cols, n_full, mask=valid)


@triton.jit
def _append_columns(IDX, col_base, counts, rows, selected):
    """Per column j: write ``rows[selected[:, j], j]`` at ``IDX[col_base[j] + counts[j] + rank]``."""
    picked = selected.to(tl.int32)
    pos = counts[None, :] + tl.cumsum(picked, 0) - 1
    tl.store(IDX + col_base[None, :] + pos, rows, mask=selected)
    return counts + tl.sum(picked, 0)


def _sub_tile(q_block: int, kv_block: int) -> tuple[int, int]:
    """(SUB_M, SUB_N): powers of two covering a block, about SUB_TILE_ELEMENTS pairs at a time."""
    sub_n = min(triton.next_power_of_2(kv_block), 128)
    sub_m = min(triton.next_power_of_2(q_block), max(1, SUB_TILE_ELEMENTS // sub_n))
    return sub_m, sub_n


def build_block_tables(
    mod: BlockMaskMod,
    B: int,
    H: int,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    device: torch.device,
    separate_full: bool = True,
) -> BlockTables:
    """Classify every (b, h, q block, kv block) tile of ``mod`` on ``device`` and list the kv side.

    Returns BlockTables with the kv-side lists (int32 (B, H, NQ) counts and (B, H, NQ, NKV)
    indices, unused slots 0) and no q side: :func:`build_q_side` derives it when a backward needs it.

    How it is parallelized: one program per (q block, h, b) over that row of NKV tiles, no host
    synchronisation. Positions past ``q_len`` / ``kv_len`` in a tail block are ignored (a tail
    block whose in-range pairs are all allowed is FULL). Memory: the tables it returns, nothing else.

    Example (through the interpreter on CPU, ``TRITON_INTERPRET=1``)::

        mod = flexattn.compiler.compile_block_mask_mod(lambda b, h, q, kv: q >= kv, device="cpu")
        tables = build_block_tables(mod, 1, 1, 300, 300, 128, 128, torch.device("cpu"))
        tables.full_kv_num_blocks[0, 0].tolist()     # [0, 1, 2]
    """
    nq, nkv = triton.cdiv(q_len, q_block), triton.cdiv(kv_len, kv_block)
    _check_grid(B, H)
    i32 = dict(dtype=torch.int32, device=device)
    kv_num = torch.empty(B, H, nq, **i32)
    kv_idx = torch.empty(B, H, nq, nkv, **i32)
    if separate_full:
        full_num, full_idx = torch.empty_like(kv_num), torch.empty_like(kv_idx)
    else:  # never written (SEPARATE_FULL=False)
        full_num = full_idx = kv_num
    sub_m, sub_n = _sub_tile(q_block, kv_block)
    with _on(device):  # Triton launches on the current device
        _classify_kernel[(nq, H, B)](
            kv_num, kv_idx, full_num, full_idx,
            q_len, kv_len, nq, nkv, H, q_block, kv_block,
            mod.mask.fn, mod.mask.args, mod.interval_fn, mod.ranges,
            T=KV_BLOCKS_PER_STEP, SUB_M=sub_m, SUB_N=sub_n, SEPARATE_FULL=separate_full,
            num_warps=4,
        )  # fmt: skip
    if not separate_full:
        full_num = full_idx = None
    return BlockTables(kv_num, kv_idx, full_num, full_idx, None, None, None, None, q_block, kv_block)


def build_q_side(tables: BlockTables) -> BlockTables:
    """``tables`` with the transposed (q-side) view derived on the device from its kv-side lists.

    Returns q_num_blocks int32 (B, H, NKV) and q_indices int32 (B, H, NKV, NQ) (unused slots 0),
    and the same for the full blocks when ``tables`` has them; equal to
    ``block_mask_build.transpose_ordered`` of the kv side.

    How it is parallelized: ``_classes_kernel`` runs one program per row of kv lists (b, h, q
    block) and marks the row's blocks in an int8 (B, H, NQ, NKV) class table; ``_transpose_kernel``
    one program per (32 kv blocks, h, b) over the NQ q blocks. Launched back to back, no host
    synchronisation. Memory: the q-side tables plus the class table (B*H*NQ*NKV bytes, dropped on
    return). Kv-side entries outside [0, NKV) (a malformed mask) are ignored, never written through.
    """
    B, H, nq, nkv = tables.kv_indices.shape
    _check_grid(B, H)
    device = tables.kv_indices.device
    has_full = tables.has_full
    kv_num, kv_idx = tables.kv_num_blocks.contiguous(), tables.kv_indices.contiguous()
    full_num = tables.full_kv_num_blocks.contiguous() if has_full else kv_num
    full_idx = tables.full_kv_indices.contiguous() if has_full else kv_idx
    i32 = dict(dtype=torch.int32, device=device)
    classes = torch.zeros(B, H, nq, nkv, dtype=torch.int8, device=device)
    q_num = torch.empty(B, H, nkv, **i32)
    q_idx = torch.zeros(B, H, nkv, nq, **i32)
    if has_full:
        full_q_num, full_q_idx = torch.empty_like(q_num), torch.zeros_like(q_idx)
    else:  # never written (SEPARATE_FULL=False)
        full_q_num = full_q_idx = q_num
    with _on(device):
        _classes_kernel[(B * H * nq,)](
            kv_num, kv_idx, full_num, full_idx, classes, nkv,
            T=KV_BLOCKS_PER_STEP, HAS_FULL=has_full, num_warps=4,
        )  # fmt: skip
        _transpose_kernel[(triton.cdiv(nkv, COLUMNS_PER_PROGRAM), H, B)](
            classes, q_num, q_idx, full_q_num, full_q_idx, nq, nkv, H,
            T=COLUMNS_PER_PROGRAM, QS=Q_BLOCKS_PER_STEP, SEPARATE_FULL=has_full, num_warps=4,
        )  # fmt: skip
    if not has_full:
        full_q_num = full_q_idx = None
    return tables.with_q_side(q_num, q_idx, full_q_num, full_q_idx)


def _check_grid(B: int, H: int) -> None:
    if max(B, H) > MAX_GRID_YZ:
        raise ValueError(
            f"create_block_mask on the device supports B and H up to {MAX_GRID_YZ} (CUDA's grid limit), "
            f"got B={B}, H={H}: split the batch into several masks."
        )


def _on(device: torch.device):
    """The CUDA device context of ``device`` (a no-op elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
