"""The split-KV decode kernel: GQA packing, query offsets, ragged caches, the compiled mods inlined.

For short queries (decoding: 1 to a few dozen query tokens per sequence) the prefill kernel has too
few query tiles to fill the GPU and reads every K/V byte once per query head. This kernel instead

- packs the query rows of PACK query heads that share one kv head (a GQA group, or one head when
  the block mask differs per head) into the rows of one tile: row ``r`` is token ``r // PACK`` of
  head ``r % PACK`` of the group, so each K/V tile is loaded once per kv head;
- splits the keys across programs (NUM_SPLITS, chosen at run time by ``kernel_choice.choose_splits``);
  each split writes a partial ``(out fp32, lse, max)`` to a workspace, and the last split of a tile
  to finish (``merge="FUSED"``, the default) or ``_decode_merge_kernel`` (``merge="KERNEL"``)
  combines the splits through their lse (max-shifted: exact up to rounding);
- reads where the rows sit from ``Positions``: query token ``i`` of batch ``b`` is position
  ``q_offset[b] + i`` (the mods see it, the BlockMask is indexed by it) and sequence ``b`` has
  ``kv_lengths[b]`` keys; splits past a sequence's length exit at once.

Glossary:
    B, HQ, HKV        batch, query heads, key/value heads (query head h reads kv head h // GQA_GROUP)
    Q_LEN, KV_LEN     query tokens per sequence, the key tensors' (padded) length
    PACK              query heads per tile (GQA_GROUP, or 1 with a per-head block mask)
    BLOCK_M, BLOCK_N  the tile: BLOCK_M packed rows (>= 16 for tl.dot) x BLOCK_N keys
    UNIT              the split granularity: KV_BLOCK with a block mask (SPARSE), else BLOCK_N
    UNITS_PER_SPLIT   units of keys per split; split s covers keys [s, s + 1) * UNITS_PER_SPLIT * UNIT
    Q_BLOCK, KV_BLOCK the BlockMask's block sizes (BLOCK_N divides KV_BLOCK; BLOCK_M // PACK <= Q_BLOCK,
                      so one tile's tokens lie in at most two q blocks of the mask)

Block-sparse walk (SPARSE): when all of a tile's tokens lie in one q block of the mask (the common
case), the split visits the entries of that row's partial list, then of its full list, that fall
in its key range (found by counting list entries: ``_list_bounds``, one load for lists of up to
SEARCH_CHUNK blocks), as the prefill kernel does. When they straddle two q
blocks, the split visits the kv blocks of its range in order, looks each up in both rows' (partial,
full) lists with a moving pointer per list, and attends only where some row lists the block. Full
blocks skip the mask_mod; a partial block evaluates it for the rows that list it as partial.
Without a block mask (not SPARSE) every key is visited and no list is read.

Scores as in the prefill kernel: an identity score mod folds the scale into exp2, an additive one
(``score + bias``) adds its bias in base 2. The tile that may overhang the sequence's end clamps
the positions the mods see and drops the tail's scores; tiles of TAIL_BRANCH_ROWS rows or more
decide that per tile by a uniform branch (shorter tiles do both always: a branch in their loop
costs more than it saves; BENCHMARKS.md, thirteenth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.checks import block_table_args, check_block_tables, check_call_kv
from flexattn.kernels.decode_workspace import DecodeWorkspace, decode_workspace
from flexattn.kernels.device import DeviceLimits, device_limits, dot_precision
from flexattn.kernels.kernel_choice import DecodeLaunch, DecodeTiles, decode_launch
from flexattn.kernels.launch import LaunchCache, alignment, args_key, broadcast_strides
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.positions import NO_POSITIONS, Positions
from flexattn.kernels.tile_io import (
    clamp_tail,
    listed_blocks,
    load_kv,
    mask_row,
    mask_tail,
    paged_rows,
    sparse_tile_start,
    tile_source,
)
from flexattn.kernels.tiles import padded_head_dim
from flexattn.options import DECODE_MERGES

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
SEARCH_CHUNK = tl.constexpr(128)  # list entries a search loads per round (one per thread at 4 warps)
TAIL_BRANCH_ROWS = tl.constexpr(64)  # tiles of this many rows or more test the sequence tail by a branch


# fmt: off
@triton.jit
def _decode_tile(
    acc, l_i, m_i,                                   # running output (BLOCK_M, EV_PAD), row sum, row max
    q, k_src, v_src, start_n, kv_len, b, h, q_idx,   # this tile: first key, the sequence's key count
    pages,                                           # the sequence's page-table row (PAGE > 0)
    status, any_partial,                             # per row: 0 skip / 1 partial / 2 full; scalar
    k_strides, v_strides, scale,
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    SPARSE: tl.constexpr, ROW_STATUS: tl.constexpr, CHECK_N: tl.constexpr,
    E: tl.constexpr, E_PAD: tl.constexpr, EV: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr,
    BIAS_FN: tl.constexpr, PAGE: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile: q.k, mods, masks, online-softmax update of (acc, l_i, m_i).

    SPARSE: a block of the mask; ``any_partial`` says whether some row evaluates the mask_mod. With
    ROW_STATUS each row's ``status`` decides (the tile straddles two q blocks of the mask), else
    every row has one status: full (``any_partial`` false: no mask at all) or partial.
    Scores as in the prefill kernel: raw q.k with an identity score mod (the scale folds into exp2),
    base 2 with an additive one (``qk * (scale * log2e) + BIAS_FN``), else natural units.
    Paged (PAGE > 0): the tile's physical rows are found once and serve the K and the V load."""
    kv_rows = paged_rows(pages, start_n, kv_len, BLOCK_N, CHECK_N, PAGE)
    k = load_kv(k_src, kv_rows, b, 0, start_n, k_strides, kv_len, E, E_PAD, BLOCK_N, CHECK_N, False, PAGE)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SCORE_IS_IDENTITY:
        scores = qk
        to_base2 = scale * LOG2E
    elif SCORE_IS_ADDITIVE:
        scores = qk * (scale * LOG2E)
        to_base2 = 1.0
    else:
        scores = qk * scale
        to_base2 = LOG2E
    kv_pos = start_n + tl.arange(0, BLOCK_N)
    kv_idx = kv_pos[None, :]
    # -- a tile that may overhang the sequence holds its positions in bounds and drops the tail. Tall
    #    tiles (64+ rows) test it by a uniform branch, so their whole tiles pay neither the clamp nor a
    #    select per score; short ones always do both (cheaper there than a branch in the loop: the
    #    decode A/B in BENCHMARKS.md, thirteenth session) --
    if not CHECK_N:
        overhangs = False
    elif q.shape[0] >= TAIL_BRANCH_ROWS:
        overhangs = start_n + BLOCK_N > kv_len
    else:
        overhangs = True
    if overhangs:
        kv_idx = clamp_tail(kv_pos, kv_len)[None, :]  # tail keys read in bounds; mask_tail drops them
    if SCORE_IS_ADDITIVE:
        scores = scores + BIAS_FN(b, h, q_idx, kv_idx, SCORE_ARGS)
    elif not SCORE_IS_IDENTITY:
        scores = SCORE_FN(scores, b, h, q_idx, kv_idx, SCORE_ARGS)
    if SPARSE:
        if ROW_STATUS:
            allowed = (status[:, None] > 0) & (kv_idx >= 0)  # (BLOCK_M, BLOCK_N)
            if any_partial:
                keep = MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS)
                allowed = allowed & ((status[:, None] == 2) | keep)
            scores = tl.where(allowed, scores, float("-inf"))
        elif any_partial:
            scores = tl.where(MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS), scores, float("-inf"))
    if overhangs:
        scores = mask_tail(scores, kv_pos[None, :], kv_len, True)

    # -- online softmax in base 2; rows masked so far keep p = 0 (no NaN) --
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_ref2 = tl.where(m_new == float("-inf"), 0.0, m_new) * to_base2
    p = tl.math.exp2(scores * to_base2 - m_ref2[:, None])
    alpha = tl.math.exp2(m_i * to_base2 - m_ref2)
    l_i = l_i * alpha + tl.sum(p, 1)

    # -- accumulate p @ v --
    v = load_kv(v_src, kv_rows, b, 0, start_n, v_strides, kv_len, EV, EV_PAD, BLOCK_N, CHECK_N, False, PAGE)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _lower_bound(idx_row, n, target, CHUNK: tl.constexpr):
    """The first position in the sorted list ``idx_row[:n]`` whose value is >= target (n if none).

    Two rounds of independent loads, not a binary search's log2(n) dependent ones (each an L2 round
    trip on the critical path of every split: ~0.4 us apiece on the H200): CHUNK evenly spaced samples
    bracket the answer within one stride, then the entries of that stride below ``target`` are
    counted (in CHUNK-wide steps when the list is longer than CHUNK * (CHUNK + 1))."""
    offs = tl.arange(0, CHUNK)
    stride = tl.maximum(tl.cdiv(n, CHUNK), 1)
    at = offs * stride
    samples = tl.load(idx_row + at, mask=at < n, other=target)  # past the list: counts as >= target
    below = tl.sum((samples < target).to(tl.int32), 0)  # samples 0 .. below - 1 are < target
    # -- the answer lies after sample below - 1 and at most one stride further --
    base = (below - 1) * stride + 1
    count = below * 0
    for c in range(0, stride - 1, CHUNK):
        pos = base + c + offs
        inside = (below > 0) & (c + offs < stride - 1) & (pos < n)
        count += tl.sum((tl.load(idx_row + pos, mask=inside, other=target) < target).to(tl.int32), 0)
    return tl.where(below > 0, base + count, 0)


@triton.jit
def _list_bounds(idx_row, n, lo, hi, COLS, CHUNK: tl.constexpr):
    """``(first, last)``: the first positions in the sorted list ``idx_row[:n]`` whose values are >= lo
    and >= hi (:func:`_lower_bound`'s answers for both).

    The row's first CHUNK entries are loaded without waiting for ``n`` (a row holds COLS >= n of
    them), so for a list of at most CHUNK blocks (every split's list up to 16k keys at 128-key blocks)
    the search is that one load, in flight together with the count's: one L2 round trip less on the
    critical path before a split's first tile."""
    offs = tl.arange(0, CHUNK)
    head = tl.load(idx_row + offs, mask=offs < COLS, other=0)
    if n <= CHUNK:
        listed = offs < n
        first = tl.sum((listed & (head < lo)).to(tl.int32), 0)
        last = tl.sum((listed & (head < hi)).to(tl.int32), 0)
    else:
        first = _lower_bound(idx_row, n, lo, CHUNK)
        last = _lower_bound(idx_row, n, hi, CHUNK)
    return first, last


@triton.jit
def _listed(idx_row, n, ptr, block):
    """Whether ``block`` is the list's entry at ``ptr`` (blocks are visited in ascending order), and
    the pointer moved past it if so."""
    value = tl.load(idx_row + tl.minimum(ptr, tl.maximum(n - 1, 0)))
    hit = (ptr < n) & (value == block)
    return hit, ptr + hit.to(tl.int32)


# Lengths, offsets and split sizes change per call: not specialized, so they reuse the compiled kernel.
@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "q_offset", "MASK_H", "MASK_NQ", "MASK_NKV",
                               "page_table_stride", "UNITS_PER_SPLIT"])
def _decode_split_kernel(
    # tensors: q (B, HQ, Q_LEN, E), k (B, HKV, KV_LEN, E), v (B, HKV, KV_LEN, EV); strides (batch, head,
    # position, feature). Workspace (contiguous fp32): PART_OUT (NUM_SPLITS, B, HQ, Q_LEN, EV),
    # PART_LSE and PART_MAX (NUM_SPLITS, B, HQ, Q_LEN)
    Q, K, V, PART_OUT, PART_LSE, PART_MAX,
    q_strides, k_strides, v_strides,
    # FUSED_MERGE: the last split of a tile to finish merges them all into OUT (B, HQ, Q_LEN, EV), LSE
    # and MAX_SCORES (B, HQ, Q_LEN); ARRIVALS int32 (B, grid dim 1), zero between calls, counts them
    OUT, LSE, MAX_SCORES, o_strides, ARRIVALS,
    # positions: int32 (B,) query offsets (PER_BATCH_Q_OFFSET) or the int q_offset; int32 (B,) key counts
    # (HAS_KV_LENGTHS) or KV_LEN for every sequence
    Q_OFFSETS, q_offset, KV_LENGTHS,
    # block mask (SPARSE; contiguous): counts (MB, MASK_H, MASK_NQ), indices (MB, MASK_H, MASK_NQ, MASK_NKV)
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, MASK_H, MASK_NQ, MASK_NKV,
    # paged K/V (PAGE > 0): k/v are caches (1, HKV, N_PAGES * PAGE, E) read through PAGE_TABLE int32
    # (B, MAX_PAGES); KV_LEN is then the logical length
    PAGE_TABLE, page_table_stride,
    # sizes, scale, splits
    B, Q_LEN, KV_LEN, HQ, scale, UNITS_PER_SPLIT,
    # compiled mods
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    # meta-parameters
    GQA_GROUP: tl.constexpr, PACK: tl.constexpr, M_TILES: tl.constexpr,
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    MASK_PER_BATCH: tl.constexpr, MASK_PER_HEAD: tl.constexpr, SPARSE: tl.constexpr, HAS_FULL: tl.constexpr,
    PER_BATCH_Q_OFFSET: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr,
    BIAS_FN: tl.constexpr, PAGE: tl.constexpr, FUSED_MERGE: tl.constexpr,
):
    # -- which work: program (split, group * M_TILES + m, b); exit at once past the sequence's keys --
    split = tl.program_id(0)
    group = tl.program_id(1) // M_TILES
    m_tile = tl.program_id(1) % M_TILES
    b = tl.program_id(2)
    if HAS_KV_LENGTHS:
        kv_len = tl.minimum(tl.maximum(tl.load(KV_LENGTHS + b), 0), KV_LEN)  # (in bounds whatever the values)
    else:
        kv_len = KV_LEN
    UNIT: tl.constexpr = KV_BLOCK if SPARSE else BLOCK_N
    split_start = split * UNITS_PER_SPLIT * UNIT
    if split_start < kv_len:
        split_end = tl.minimum(split_start + UNITS_PER_SPLIT * UNIT, kv_len)
        if PER_BATCH_Q_OFFSET:
            q_off = tl.load(Q_OFFSETS + b)
        else:
            q_off = q_offset

        # -- the packed rows: token r // PACK of query head group * PACK + r % PACK --
        token, row_ok, h = _packed_rows(group, m_tile, Q_LEN, PACK, BLOCK_M)
        hk = (group * PACK) // GQA_GROUP
        b64 = b.to(tl.int64)
        offs_e = tl.arange(0, E_PAD)
        q_ptrs = (Q + b64 * q_strides[0] + h.to(tl.int64)[:, None] * q_strides[1]
                  + token.to(tl.int64)[:, None] * q_strides[2] + offs_e[None, :] * q_strides[3])
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        q_pos = q_off + token
        q_idx = q_pos[:, None]
        h_idx = h[:, None]
        k_src = tile_source(K, b, hk, k_strides, False)  # (paged: batch stride 0)
        v_src = tile_source(V, b, hk, v_strides, False)
        pages = PAGE_TABLE + b64 * page_table_stride  # (unused when PAGE == 0)
        kn_strides = (k_strides[2], k_strides[3])
        vn_strides = (v_strides[2], v_strides[3])

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, EV_PAD], dtype=tl.float32)

        if SPARSE:
            # -- the tile's two q-block rows of the mask (the same one when its tokens share a block) --
            first_token = (m_tile * BLOCK_M) // PACK
            last_token = tl.minimum((m_tile * BLOCK_M + BLOCK_M - 1) // PACK, Q_LEN - 1)
            row_block0 = tl.minimum(tl.maximum((q_off + first_token) // Q_BLOCK, 0), MASK_NQ - 1)
            row_block1 = tl.minimum(tl.maximum((q_off + last_token) // Q_BLOCK, 0), MASK_NQ - 1)
            list_row0 = mask_row(b, group * PACK, row_block0, MASK_H, MASK_NQ, MASK_PER_BATCH, MASK_PER_HEAD)
            list_row1 = mask_row(b, group * PACK, row_block1, MASK_H, MASK_NQ, MASK_PER_BATCH, MASK_PER_HEAD)
            block_start = split_start // KV_BLOCK
            block_end = tl.cdiv(split_end, KV_BLOCK)
            TILES_PER_BLOCK: tl.constexpr = KV_BLOCK // BLOCK_N
            if row_block0 == row_block1:
                # -- one mask row for the whole tile: its lists' entries in this split, partial then full.
                #    Both lists are searched before either is walked, so their loads overlap (a split's
                #    fixed cost: at 8k keys a split walks only ~10 blocks) --
                idx_p, n_p = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row0, MASK_NKV,
                                           False)
                first_p, last_p = _list_bounds(idx_p, n_p, block_start, block_end, MASK_NKV, SEARCH_CHUNK)
                if HAS_FULL:
                    idx_f, n_f = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row0,
                                               MASK_NKV, True)
                    first_f, last_f = _list_bounds(idx_f, n_f, block_start, block_end, MASK_NKV, SEARCH_CHUNK)
                for full in tl.static_range(2 if HAS_FULL else 1):
                    idx_row, first, last = idx_p, first_p, last_p
                    if full == 1:
                        idx_row, first, last = idx_f, first_f, last_f
                    for tile in range(first * TILES_PER_BLOCK, last * TILES_PER_BLOCK):
                        start_n = sparse_tile_start(idx_row, tile, 1, KV_BLOCK, BLOCK_N)
                        acc, l_i, m_i = _decode_tile(  # (one status for every row: no per-row status)
                            acc, l_i, m_i, q, k_src, v_src, start_n, kv_len, b, h_idx, q_idx, pages,
                            m_i, full == 0, kn_strides, vn_strides, scale,
                            SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, True, False, True,
                            E, E_PAD, EV, EV_PAD, BLOCK_N, DOT_PRECISION, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE,
                            BIAS_FN, PAGE,
                        )
            else:
                # -- tokens in two q blocks: walk the split's kv blocks, looking each up in both rows' lists --
                in_row1 = (q_pos // Q_BLOCK) != row_block0
                idx_p0, n_p0 = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row0,
                                             MASK_NKV, False)
                idx_p1, n_p1 = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row1,
                                             MASK_NKV, False)
                ptr_p0 = _lower_bound(idx_p0, n_p0, block_start, SEARCH_CHUNK)
                ptr_p1 = _lower_bound(idx_p1, n_p1, block_start, SEARCH_CHUNK)
                if HAS_FULL:
                    idx_f0, n_f0 = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row0,
                                                 MASK_NKV, True)
                    idx_f1, n_f1 = listed_blocks(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row1,
                                                 MASK_NKV, True)
                    ptr_f0 = _lower_bound(idx_f0, n_f0, block_start, SEARCH_CHUNK)
                    ptr_f1 = _lower_bound(idx_f1, n_f1, block_start, SEARCH_CHUNK)
                for block in range(block_start, block_end):
                    hit_p0, ptr_p0 = _listed(idx_p0, n_p0, ptr_p0, block)
                    hit_p1, ptr_p1 = _listed(idx_p1, n_p1, ptr_p1, block)
                    status0 = hit_p0.to(tl.int32)
                    status1 = hit_p1.to(tl.int32)
                    if HAS_FULL:
                        hit_f0, ptr_f0 = _listed(idx_f0, n_f0, ptr_f0, block)
                        hit_f1, ptr_f1 = _listed(idx_f1, n_f1, ptr_f1, block)
                        status0 = tl.where(hit_f0, 2, status0)
                        status1 = tl.where(hit_f1, 2, status1)
                    if (status0 > 0) | (status1 > 0):
                        status = tl.where(in_row1, status1, status0)
                        any_partial = tl.max((status == 1).to(tl.int32), 0) > 0
                        for t in tl.static_range(TILES_PER_BLOCK):
                            start_n = block * KV_BLOCK + t * BLOCK_N
                            if start_n < split_end:
                                acc, l_i, m_i = _decode_tile(
                                    acc, l_i, m_i, q, k_src, v_src, start_n, kv_len, b, h_idx, q_idx, pages,
                                    status, any_partial, kn_strides, vn_strides, scale,
                                    SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, True, True, True,
                                    E, E_PAD, EV, EV_PAD, BLOCK_N, DOT_PRECISION, SCORE_IS_IDENTITY,
                                    SCORE_IS_ADDITIVE, BIAS_FN, PAGE,
                                )
        else:
            # -- every key of the split: whole tiles unchecked, then the sequence's tail tile --
            full_tiles = (split_end - split_start) // BLOCK_N
            for tile in range(0, full_tiles):
                start_n = split_start + tile * BLOCK_N
                acc, l_i, m_i = _decode_tile(
                    acc, l_i, m_i, q, k_src, v_src, start_n, kv_len, b, h_idx, q_idx, pages,
                    m_i, False, kn_strides, vn_strides, scale,
                    SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, False, False, False,
                    E, E_PAD, EV, EV_PAD, BLOCK_N, DOT_PRECISION, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE,
                    BIAS_FN, PAGE,
                )
            if split_start + full_tiles * BLOCK_N < split_end:
                start_n = split_start + full_tiles * BLOCK_N
                acc, l_i, m_i = _decode_tile(
                    acc, l_i, m_i, q, k_src, v_src, start_n, kv_len, b, h_idx, q_idx, pages,
                    m_i, False, kn_strides, vn_strides, scale,
                    SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, False, False, True,
                    E, E_PAD, EV, EV_PAD, BLOCK_N, DOT_PRECISION, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE,
                    BIAS_FN, PAGE,
                )

        # -- this split's partial result: normalised out, lse and max (natural units); empty: 0, -inf --
        if SCORE_IS_IDENTITY:
            m_i = m_i * scale
        elif SCORE_IS_ADDITIVE:
            m_i = m_i * (1.0 / LOG2E)  # back to natural units
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        stat_row = ((split * B + b).to(tl.int64) * HQ + h) * Q_LEN + token
        offs_ev = tl.arange(0, EV_PAD)
        tl.store(PART_OUT + stat_row[:, None] * EV + offs_ev[None, :], acc,
                 mask=row_ok[:, None] & (offs_ev[None, :] < EV))
        tl.store(PART_LSE + stat_row, lse, mask=row_ok)
        tl.store(PART_MAX + stat_row, m_i, mask=row_ok)
        if FUSED_MERGE:
            # -- the tile's last split to arrive merges them (every split's stores are done before
            #    its arrival: a barrier, then one thread's acq_rel atomic at GPU scope) --
            tl.debug_barrier()
            slot = ARRIVALS + b * tl.num_programs(1) + tl.program_id(1)
            n_run = tl.cdiv(kv_len, UNITS_PER_SPLIT * UNIT)
            if tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == n_run - 1:
                tl.store(slot, 0)  # zero again for the next call (ordered after this one by the stream)
                _merge_rows(PART_OUT, PART_LSE, PART_MAX, OUT, LSE, MAX_SCORES, o_strides, b, h, token, row_ok,
                            n_run, B, HQ, Q_LEN, EV, EV_PAD, BLOCK_M)
    elif FUSED_MERGE:  # noqa: SIM102 (a constexpr, then a runtime value: nested for Triton)
        if split == 0:  # a sequence with no keys (ragged): its rows are empty, out 0, lse = max = -inf
            token, row_ok, h = _packed_rows(group, m_tile, Q_LEN, PACK, BLOCK_M)
            _merge_rows(PART_OUT, PART_LSE, PART_MAX, OUT, LSE, MAX_SCORES, o_strides, b, h, token, row_ok,
                        0, B, HQ, Q_LEN, EV, EV_PAD, BLOCK_M)


@triton.jit
def _packed_rows(group, m_tile, Q_LEN, PACK: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(token, row_ok, h)`` (BLOCK_M,) of row tile ``m_tile`` of head group ``group``: row r is token
    r // PACK of query head group * PACK + r % PACK; padding rows (past Q_LEN) repeat token 0."""
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // PACK
    row_ok = token < Q_LEN
    token = tl.where(row_ok, token, 0)  # (never stored)
    return token, row_ok, group * PACK + rows % PACK


@triton.jit
def _merge_rows(PART_OUT, PART_LSE, PART_MAX, OUT, LSE, MAX_SCORES, o_strides, b, h, token, row_ok, n_splits,
                B, HQ, Q_LEN, EV: tl.constexpr, EV_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Merge the partials of splits ``[0, n_splits)`` of output rows (b, h, token) (h, token, row_ok:
    (ROWS,) vectors; b a scalar) through their lse and store out, lse and max_scores; rows with
    no split (or only empty ones) get out 0, lse = max = -inf. The partials are read from L2
    (``.cg``): with FUSED_MERGE other programs wrote them during this launch."""
    stat = (b.to(tl.int64) * HQ + h) * Q_LEN + token  # split 0's row; the outputs' row
    split_stride = B * HQ * Q_LEN
    offs_ev = tl.arange(0, EV_PAD)
    lse_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    max_score = lse_max
    for s in range(0, n_splits):
        part = stat + s * split_stride
        lse_max = tl.maximum(lse_max, tl.load(PART_LSE + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg"))
        max_score = tl.maximum(max_score, tl.load(PART_MAX + part, mask=row_ok, other=float("-inf"),
                                                  cache_modifier=".cg"))
    # -- exact merge through the lse: weights exp(lse_s - max_s lse_s) --
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    acc = tl.zeros([ROWS, EV_PAD], dtype=tl.float32)
    weight_sum = tl.zeros_like(lse_max)
    ev_ok = row_ok[:, None] & (offs_ev[None, :] < EV)
    for s in range(0, n_splits):
        part = stat + s * split_stride
        weight = tl.exp(tl.load(PART_LSE + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg") - lse_ref)
        acc += weight[:, None] * tl.load(PART_OUT + part[:, None] * EV + offs_ev[None, :], mask=ev_ok, other=0.0,
                                         cache_modifier=".cg")
        weight_sum += weight
    empty = weight_sum == 0.0
    out = acc / tl.where(empty, 1.0, weight_sum)[:, None]
    lse = tl.where(empty, float("-inf"), lse_ref + tl.log(tl.where(empty, 1.0, weight_sum)))
    o_ptrs = (OUT + b.to(tl.int64) * o_strides[0] + h.to(tl.int64)[:, None] * o_strides[1]
              + token.to(tl.int64)[:, None] * o_strides[2] + offs_ev[None, :] * o_strides[3])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=ev_ok)
    tl.store(LSE + stat, lse, mask=row_ok)
    tl.store(MAX_SCORES + stat, max_score, mask=row_ok)


@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "SPLIT_SIZE"])
def _decode_merge_kernel(
    # workspace as written by _decode_split_kernel; OUT (B, HQ, Q_LEN, EV), LSE and MAX_SCORES (B, HQ, Q_LEN)
    PART_OUT, PART_LSE, PART_MAX, OUT, LSE, MAX_SCORES, o_strides,
    KV_LENGTHS, B, HQ, Q_LEN, KV_LEN, SPLIT_SIZE,
    EV: tl.constexpr, EV_PAD: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr,
):
    # -- one program per output row (b, h, token); splits past the sequence's keys were never written --
    row = tl.program_id(0)
    b = row // (HQ * Q_LEN)
    if HAS_KV_LENGTHS:
        kv_len = tl.minimum(tl.maximum(tl.load(KV_LENGTHS + b), 0), KV_LEN)
    else:
        kv_len = KV_LEN
    one = tl.zeros([1], dtype=tl.int32)  # (the row as a vector of one: the helper takes vectors)
    h = (row // Q_LEN) % HQ + one
    token = row % Q_LEN + one
    _merge_rows(PART_OUT, PART_LSE, PART_MAX, OUT, LSE, MAX_SCORES, o_strides, b, h, token, one == 0,
                tl.cdiv(kv_len, SPLIT_SIZE), B, HQ, Q_LEN, EV, EV_PAD, 1)


# fmt: on
def flex_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score_mod,
    mask_mod,
    tables: BlockTables | None,
    scale: float,
    positions: Positions | None = None,
    splits: int | None = None,
    tiles: DecodeTiles | None = None,
    target: DeviceLimits | None = None,
    paged: PagedKV | None = None,
    merge: str = "FUSED",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-KV attention forward for short queries (no backward: decoding is inference).

    Args:
        q: (B, Hq, Lq, E); k: (B, Hkv, Lkv, E); v: (B, Hkv, Lkv, Ev). fp16, bf16 or fp32, any strides.
            ``Hq % Hkv == 0``; query head h reads kv head h // (Hq // Hkv).
        score_mod, mask_mod: ``KernelMod``s (the mods see absolute positions ``q_offset[b] + i``).
        tables: the block mask's ``BlockTables`` in absolute positions (built for the whole sequence:
            ``NQ >= ceil((max q_offset + Lq) / q_block)`` rows), or None: attend to every key
            (mask_mod must then be trivial). A per-head mask packs one query head per tile.
        scale: multiplies q.k before score_mod.
        positions: query offsets and per-sequence key counts (``Positions``; kv_offset must be 0);
            None: tokens at 0..Lq-1, every key present. Checked by the caller (``Positions.check``).
        splits: the number of key splits (default ``kernel_choice.choose_splits`` from the lengths
            and the GPU's SM count); tests pass several to check the merge.
        tiles: an explicit ``DecodeTiles`` (default ``kernel_choice.decode_tiles``).
        target: the GPU to plan for (default: the tensors' device).
        paged: K/V in a paged cache (``PagedKV``), or None (contiguous). Then k and v are the caches
            (1, Hkv, n_pages * page_size, E / Ev), read through ``paged.page_table`` (no gather copy);
            the key length is ``paged.kv_len`` (logical positions: the mods, the tables and
            ``positions.kv_lengths`` see them). ``tables`` are required and must keep the softmax off
            rows of unreserved pages (``flexattn.paged.PagedAttention.convert_logical_block_mask``).
        merge: how the splits' partials are combined (kernel_options DECODE_MERGE's values): "FUSED"
            (the default: the last split of each tile to finish merges them, counted by an atomic in
            the workspace: one launch) or "KERNEL" (``_decode_merge_kernel``, a second launch).

    Returns:
        out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) fp32 natural log, max_scores (B, Hq, Lq) fp32;
        a row with no allowed key gives out 0, lse = max = -inf.

    Parallelization: grid ``(splits, Hq // PACK * M_TILES, B)``. Program (s, g, b) loads the packed
    query rows of head group g (PACK heads x Lq tokens, M_TILES tiles of BLOCK_M rows when they do not
    fit one) once, streams the keys of split s of sequence b (block-sparse: only listed kv blocks;
    exits at once when the split starts past ``kv_lengths[b]``) with the online softmax in registers,
    and writes a partial (out, lse, max) to an fp32 workspace. The last program of (g, b) to finish
    combines the partials of the splits that ran, over its tile's rows (``merge="FUSED"``); with
    ``merge="KERNEL"`` ``_decode_merge_kernel`` (one program per output row) does.

    Example (CPU through the interpreter, ``TRITON_INTERPRET=1``)::

        out, lse, mx = flex_decode(q, k, v, score_mod=compile_score_mod(None),
                                   mask_mod=compile_mask_mod(None), tables=None, scale=0.125)
    """
    positions = NO_POSITIONS if positions is None else positions
    if merge not in DECODE_MERGES:
        raise ValueError(f"flex_decode: merge must be one of {DECODE_MERGES}, got {merge!r}.")
    if positions.kv_offset != 0:
        raise ValueError(
            f"flex_decode: Positions.kv_offset={positions.kv_offset} is not supported by the decode kernel; "
            "pass the keys from position 0 (kv_offset=0)."
        )
    if tables is None and not mask_mod.trivial:
        raise ValueError(
            "flex_decode: a mask_mod needs its BlockTables (tables=None means attend everywhere)."
        )
    target = device_limits(q.device) if target is None else target
    device_table = tables.kv_num_blocks if tables is not None else q
    if paged is not None and tables is None:
        raise ValueError(
            "flex_decode: a paged cache needs its BlockTables (from PagedAttention."
            "convert_logical_block_mask): they keep the rows of unreserved pages out of the softmax."
        )
    B, Hq, Lq, E, Lkv = check_call_kv(q, k, v, device_table, target, paged)
    Hkv, Ev = k.shape[1], v.shape[3]
    launch = decode_launch(
        batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lkv, head_dim=E, v_head_dim=Ev, dtype=q.dtype,
        q_block=tables.q_block if tables is not None else None,
        kv_block=tables.kv_block if tables is not None else None,
        per_head_mask=tables is not None and tables.kv_num_blocks.shape[1] > 1, target=target,
        ragged=positions.kv_lengths is not None, splits=splits, tiles=tiles,
        page=0 if paged is None else paged.page_size,
    )  # fmt: skip
    tiles, pack = launch.tiles, launch.pack
    if tables is not None:
        check_block_tables(tables, "kv", B, Hq, 1, "a decode call")
        if tables.kv_block % tiles.BLOCK_N or pack * tables.q_block < tiles.BLOCK_M:
            raise ValueError(
                f"flex_decode: tiles {tiles.BLOCK_M}x{tiles.BLOCK_N} do not fit blocks "
                f"{tables.q_block}x{tables.kv_block} (BLOCK_N must divide kv_block; BLOCK_M <= {pack} * q_block)."
            )
    out = torch.empty((B, Hq, Lq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    max_scores = torch.empty_like(lse)
    if Lkv == 0:
        return out.zero_(), lse.fill_(float("-inf")), max_scores.fill_(float("-inf"))
    work = decode_workspace(launch.splits, B, Hq, Lq, Ev, q.device)
    fused = (out, lse, max_scores) if merge == "FUSED" else None
    _launch_split(q, k, v, work, positions, tables, score_mod, mask_mod, float(scale), launch, paged, fused)
    if fused is None:
        _launch_merge(
            work, out, lse, max_scores, positions.kv_lengths, Lkv, launch.units_per_split * launch.unit
        )
    return out, lse, max_scores


def _launch_split(
    q, k, v, work: DecodeWorkspace, positions: Positions, tables: BlockTables | None, score_mod, mask_mod,
    scale: float, launch: DecodeLaunch, paged: PagedKV | None, fused: tuple | None = None,
) -> None:  # fmt: skip
    """``_decode_split_kernel`` over the grid ``(splits, Hq // PACK * M_TILES, B)``, writing ``work``;
    ``fused``: the call's ``(out, lse, max_scores)``, which its programs then merge into themselves.

    Tensors that a call does not have (per-sequence offsets or lengths, the block tables without a
    mask, the page table of a contiguous cache) are stood in for by ``q``: their loads are compiled
    out by the flags that say so."""
    (B, Hq, Lq, E), Hkv, Ev = q.shape, k.shape[1], v.shape[3]
    if paged is None:
        Lkv, page_table, page_stride, page = k.shape[2], q, 0, 0
    else:
        Lkv, page_table, page = paged.kv_len, paged.page_table, paged.page_size
        page_stride = page_table.stride(0)
    tiles, pack = launch.tiles, launch.pack
    q_offsets, kv_lengths = positions.q_offset, positions.kv_lengths
    per_batch_offset = isinstance(q_offsets, torch.Tensor)
    if tables is not None:
        table_args, broadcast_flags = block_table_args(tables, "kv")
        q_block, has_full = tables.q_block, tables.has_full
    else:
        table_args, broadcast_flags = (q, q, q, q, 1, 1, 1), _DENSE_FLAGS
        q_block, has_full = 1, False
    offsets = q_offsets if per_batch_offset else q
    q_offset = 0 if per_batch_offset else int(q_offsets)
    lengths = q if kv_lengths is None else kv_lengths
    strides = (broadcast_strides(q), broadcast_strides(k), broadcast_strides(v))
    if fused is None:  # (stood in for by the workspace, never written)
        outputs, o_strides = (work.out, work.lse, work.max_scores), (0, 0, 0, 0)
    else:
        outputs, o_strides = fused, broadcast_strides(fused[0])
    head = (q, k, v, work.out, work.lse, work.max_scores, *strides, *outputs, o_strides, work.arrivals,
            offsets)  # fmt: skip
    args = (
        *head, q_offset, lengths, *table_args,
        page_table, page_stride, B, Lq, Lkv, Hq, scale, launch.units_per_split,
        score_mod.fn, score_mod.args, mask_mod.fn, mask_mod.args,
    )  # fmt: skip
    # an int offset is unspecialised (do_not_specialize) and only its width is in the key: a repeat
    # call may pass its own (call_cache.py)
    call_ints = () if per_batch_offset else ((len(head), "q_offset"),)
    precision = dot_precision(q.dtype)
    identity = score_mod.trivial and scale > 0
    additive = not identity and score_mod.bias_fn is not None

    def keywords() -> dict:  # the constexprs and launch options by name (for Triton's binding)
        return dict(
            GQA_GROUP=Hq // Hkv, PACK=pack, M_TILES=launch.m_tiles, E=E, EV=Ev,
            E_PAD=padded_head_dim(E), EV_PAD=padded_head_dim(Ev),
            BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, Q_BLOCK=q_block, KV_BLOCK=launch.unit,
            **broadcast_flags, SPARSE=tables is not None, HAS_FULL=has_full,
            PER_BATCH_Q_OFFSET=per_batch_offset, HAS_KV_LENGTHS=kv_lengths is not None,
            DOT_PRECISION=precision, SCORE_IS_IDENTITY=identity, SCORE_IS_ADDITIVE=additive,
            BIAS_FN=score_mod.bias_fn, PAGE=page, FUSED_MERGE=fused is not None,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip

    # What Triton specialises on, or more (launch.py): the values keywords() is made of, dtypes and
    # alignment of the pointers, the specialised ints (strides, B, Hq) by value, the unspecialised
    # ones (lengths, offset, mask sizes, split size) by width.
    pointers = [q, k, v, work.out, work.lse, work.max_scores, *outputs, work.arrivals]  # (stand-ins: q)
    if per_batch_offset:
        pointers.append(offsets)
    if kv_lengths is not None:
        pointers.append(lengths)
    if tables is not None:
        pointers += table_args[:4]
    if paged is not None:
        pointers.append(page_table)
    # ``launch`` (tiles, packing, split unit) by identity: the entry keeps it alive.
    key = (
        id(launch), Hq // Hkv, E, Ev, q_block, tuple(broadcast_flags.values()), tables is not None, has_full,
        per_batch_offset, kv_lengths is not None, precision, identity, additive, q.dtype, offsets.dtype, lengths.dtype,
        table_args[0].dtype, page, page_table.dtype, strides, B, Hq, id(score_mod.fn), id(score_mod.bias_fn),
        id(mask_mod.fn),
        fused is not None, outputs[0].dtype, o_strides,
        alignment(*pointers),
        max(q_offset, Lq, Lkv, *table_args[4:], page_stride, launch.units_per_split) < 2**31,
        args_key(score_mod.args), args_key(mask_mod.args),
    )  # fmt: skip
    grid = (launch.splits, (Hq // pack) * launch.m_tiles, B)
    _SPLIT_LAUNCHES.launch(
        grid, key, args, keywords, pinned=(launch, score_mod.fn, score_mod.bias_fn, mask_mod.fn),
        call_ints=call_ints,
    )  # fmt: skip


def _launch_merge(
    work: DecodeWorkspace, out, lse, max_scores, kv_lengths, kv_len: int, split_size: int
) -> None:
    """``_decode_merge_kernel``: one program per output row (b, h, token), reading ``work``."""
    B, Hq, Lq, Ev = out.shape
    lengths = work.lse if kv_lengths is None else kv_lengths  # stands in (never read) without lengths
    o_strides = broadcast_strides(out)
    args = (work.out, work.lse, work.max_scores, out, lse, max_scores, o_strides, lengths, B, Hq, Lq, kv_len,
            split_size)  # fmt: skip
    num_warps = 4 if Ev >= 128 else 2

    def keywords() -> dict:
        return dict(
            EV=Ev, EV_PAD=padded_head_dim(Ev), HAS_KV_LENGTHS=kv_lengths is not None, num_warps=num_warps
        )

    pointers = (work.out, work.lse, work.max_scores, out, lse, max_scores, lengths)
    key = (
        Ev, kv_lengths is not None, out.dtype, lengths.dtype, o_strides, B, Hq, alignment(*pointers),
        max(Lq, kv_len, split_size) < 2**31,
    )  # fmt: skip
    _MERGE_LAUNCHES.launch((B * Hq * Lq, 1, 1), key, args, keywords)


# The compiled decode kernels by launch key: repeat calls skip Triton's argument binding (launch.py).
_SPLIT_LAUNCHES = LaunchCache(_decode_split_kernel)
_MERGE_LAUNCHES = LaunchCache(_decode_merge_kernel)
_DENSE_FLAGS = {"MASK_PER_BATCH": 0, "MASK_PER_HEAD": 0}  # no block mask: nothing broadcast
