"""Hopper (sm_90a) block-sparse attention forward in Gluon, FlashAttention-3 style (issue #16).

Glossary:
    B, HQ, HKV        batch, query heads, key/value heads (query head h reads kv head h // GQA_GROUP)
    Q_LEN, KV_LEN     sequence lengths (runtime values: new lengths do not recompile)
    E                 head dim of q, k and v (64 or 128; Ev == E)
    BLOCK_M           query rows of ONE consumer warpgroup (64); a CTA holds NUM_CONSUMERS of them
    BLOCK_N           keys per K/V tile (a power of two, as every Gluon tensor dimension)
    Q_BLOCK, KV_BLOCK the BlockMask's block sizes: a CTA's rows are exactly one q block
                      (NUM_CONSUMERS * BLOCK_M == Q_BLOCK); BLOCK_N divides KV_BLOCK
    partial / full    kv blocks where mask_mod must be evaluated / where every pair is allowed
    STAGES            depth of the shared-memory ring of K/V tiles

How a CTA is organised (one CTA per (q block, query head, batch element)):
    producer  (1 warp, few registers): TMA loads of the consumers' Q tiles, then the K and V tiles of
              the q block's row of the block tables -- its partial kv blocks, then its full ones
              (without a block mask: every tile) -- into a STAGES-deep ring; K and V each have a
              ready and an empty mbarrier per stage (empty counts NUM_CONSUMERS arrivals).
    consumers (NUM_CONSUMERS = 2 or 3 warpgroups): each owns BLOCK_M query rows and runs the online
              softmax over the same tiles in the same order with warpgroup_mma:
                  S_j = Q K_j^T (smem x smem)       O += P_{j-1} V_{j-1} (registers x smem)
              Both GEMMs of a step are issued back to back, then the consumer waits for S_j only
              and does S_j's softmax while P_{j-1} V_{j-1} still runs. With PINGPONG the consumers
              take turns issuing their GEMMs (an mbarrier per consumer, round robin).
    registers: the producer warp is given few registers (setmaxnreg), the consumers the rest.

Tiles: the mask_mod runs on partial tiles only; the score_mod on every tile. Keys past KV_LEN (TMA
zero-fills the loads: the descriptors are 4-D over (B, H, L, E)) are masked on the tiles that can
hold them -- the last KV_BLOCK // BLOCK_N tiles of each list when KV_LEN is not a multiple of
KV_BLOCK; query rows past Q_LEN are computed on zeros and not stored. The mods see positions past
the ends clamped to LEN - 1 (gathers stay in bounds; the Triton forward wraps them, and either way
those scores are masked or never stored).

Softmax in base 2: without a score mod the row max m stays in raw q.k units and p = exp2(s * qk_scale
- m * qk_scale) is one FFMA per score (qk_scale = scale * log2(e), scale > 0); with one, in natural
units. Outputs as the Triton forward's: out (B, HQ, Q_LEN, E), lse (natural log) and max_scores
(natural units) (B, HQ, Q_LEN) fp32; a row with no allowed key gets out 0, lse = max = -inf.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.checks import block_table_args, check_block_tables, check_call_kv
from flexattn.kernels.device import DeviceLimits, device_limits
from flexattn.kernels.hopper.choice import HopperTiles, hopper_tiles
from flexattn.kernels.hopper.gluon_mods import gluon_fn
from flexattn.kernels.hopper.tile_lists import ring_tile, row_lists, tile_counts, tile_start
from flexattn.kernels.mods import KernelMod
from flexattn.kernels.paged_kv import PagedKV

LOG2E = 1.4426950408889634


# fmt: off
# ---------------------------------------------------------------------------------------------
# The score/mask step: the one place the compiled score_mod / mask_mod are inlined.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _score_mask(s, q_idx, start, mods, KV_LEN, SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr,
                APPLY_MASK, CHECK_TAIL: gl.constexpr):
    """Raw q.k (fp32 [BLOCK_M, BLOCK_N]) -> (scores the softmax sees, -inf where masked; their base-2 multiplier).

    q_idx int32 [BLOCK_M, 1] (clamped into [0, Q_LEN)); the tile's keys start at ``start``; mods = (b, h, scale, qk_scale, SCORE_ARGS, MASK_ARGS). The mods follow
    flexattn's calling convention (``flexattn/kernels/mods.py``). Without a score mod (SCORE_FN None)
    the scores stay in raw q.k units and the multiplier is qk_scale. APPLY_MASK: a constexpr (False:
    a full tile, no mask work) or a runtime int1 scalar (the first tile, partial or full).
    CHECK_TAIL: the tile may hold keys at or past KV_LEN: masked,
    and the mods see them clamped to KV_LEN - 1 (gathers stay in bounds; one min, no modulo)."""
    b, h, scale, qk_scale, score_args, mask_args = mods
    # key offsets made here, where they are used: held across the loop they would cost registers
    kv_base = gl.expand_dims(gl.arange(0, s.type.shape[1], layout=gl.SliceLayout(0, s.type.layout)), 0)
    kv_pos = start + kv_base
    kv_idx = kv_pos
    if CHECK_TAIL:
        kv_idx = gl.minimum(kv_pos, KV_LEN - 1)
    if SCORE_FN is None:
        to_base2 = qk_scale
    else:
        s = SCORE_FN(s * scale, b, h, q_idx, kv_idx, score_args)
        to_base2 = 1.4426950408889634
    if APPLY_MASK:
        s = gl.where(MASK_FN(b, h, q_idx, kv_idx, mask_args), s, -float("inf"))
    if CHECK_TAIL:
        s = gl.where(kv_pos < KV_LEN, s, -float("inf"))
    return s, to_base2


@gluon.jit
def _softmax_step(s, m_i, l_i, q_idx, start, mods, KV_LEN, SCORE_FN: gl.constexpr,
                  MASK_FN: gl.constexpr, APPLY_MASK, CHECK_TAIL: gl.constexpr):
    """One tile's online-softmax update. Returns p (fp32, s's layout), alpha, m, l.

    m_i is the running row max in the units _score_mask returns (its multiplier is positive, so max
    and scaling commute); p = exp2(s * c - m * c) is one FFMA and one MUFU.EX2 per score. Rows with
    no finite score so far (masked, or -inf from a score mod) compute with m = 0: p = 0, no NaN."""
    s, to_base2 = _score_mask(s, q_idx, start, mods, KV_LEN, SCORE_FN, MASK_FN, APPLY_MASK, CHECK_TAIL)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_scaled = gl.where(m_new == -float("inf"), 0.0, m_new) * to_base2
    p = gl.exp2(s * to_base2 - gl.expand_dims(m_scaled, 1))
    alpha = gl.exp2(m_i * to_base2 - m_scaled)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


# ---------------------------------------------------------------------------------------------
# The tile sequence (``tile_lists``): the q block's partial tiles, then its full tiles (or every tile, dense).
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Producer: TMA loads into the ring.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _copy_kv_tile(desc, buf, ready, b, hk, start, pages, LAST_PAGE, KV_LEN, BLOCK_N: gl.constexpr,
                  PAGE: gl.constexpr):
    """TMA copies of the K or V tile of logical keys [start, start + BLOCK_N) into the ring buffer
    ``buf`` (1, 1, BLOCK_N, E), all counted by the mbarrier ``ready``.

    Contiguous (PAGE 0): one box at (b, hk, start) of the (B, HKV, KV_LEN, E) descriptor. Paged: the
    descriptor is over the cache (1, HKV, N_PAGES * PAGE, E) with boxes of min(PAGE, BLOCK_N) rows;
    a tile inside one page (PAGE a multiple of BLOCK_N) is one box at its physical row, a tile over
    BLOCK_N // PAGE pages is one box per page, each into its slice of the buffer: a gather of whole
    pages by TMA. Pages are looked up in the sequence's page-table row ``pages`` (-1, unreserved:
    page 0, kept out of the softmax by the block mask); a tail tile's pages past the last one
    holding keys (LAST_PAGE = cdiv(KV_LEN, PAGE) - 1) read page 0 (their keys are masked by the
    consumers' tail check; the table row may end before them)."""
    if PAGE == 0:
        tma.async_copy_global_to_shared(desc, [b, hk, start, 0], ready, buf)
    elif PAGE % BLOCK_N == 0:
        page = gl.load(pages + gl.minimum(start, KV_LEN - 1) // PAGE)  # (a tail block's tile may pass KV_LEN)
        row = gl.maximum(page, 0) * PAGE + start % PAGE
        tma.async_copy_global_to_shared(desc, [0, hk, row, 0], ready, buf)
    else:
        for i in gl.static_range(BLOCK_N // PAGE):
            logical = start // PAGE + i
            page = gl.load(pages + logical, mask=logical <= LAST_PAGE, other=0)
            tma.async_copy_global_to_shared(desc, [0, hk, gl.maximum(page, 0) * PAGE, 0], ready,
                                            buf.slice(i * PAGE, PAGE, dim=2))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, coords, lists, PAGE_TABLE, page_table_stride,
              LAST_PAGE, KV_LEN, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KV_BLOCK: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, SPARSE: gl.constexpr, HAS_FULL: gl.constexpr, PAGE: gl.constexpr):
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, hk, q_start = coords
    # the sequence's page-table row (unused when PAGE == 0), found here: a value made before the
    # partitions split would be spilled across their register reallocation
    pages = PAGE_TABLE + b.to(gl.int64) * page_table_stride
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q_start + c * BLOCK_M, 0], q_ready.index(c),
                                        q_smem.index(c))
    # bytes of one K (V) tile: a box per page when a tile spans pages
    K_BYTES: gl.constexpr = k_desc.block_type.nbytes * (BLOCK_N // k_desc.block_type.shape[2])
    V_BYTES: gl.constexpr = v_desc.block_type.nbytes * (BLOCK_N // v_desc.block_type.shape[2])
    n_partial, n_tiles = tile_counts(lists, KV_LEN, SPARSE, HAS_FULL, KV_BLOCK, BLOCK_N)
    for j in range(n_tiles):
        if j < n_partial:
            start = tile_start(lists, j, False, SPARSE, KV_BLOCK, BLOCK_N)
        else:
            start = tile_start(lists, j - n_partial, True, SPARSE, KV_BLOCK, BLOCK_N)
        stage = j % STAGES
        phase = (j // STAGES) & 1
        # a fresh mbarrier counts as having completed phase 1: the first STAGES waits pass
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), K_BYTES)
        _copy_kv_tile(k_desc, k_smem.index(stage), k_ready.index(stage), b, hk, start, pages, LAST_PAGE, KV_LEN, BLOCK_N, PAGE)
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), V_BYTES)
        _copy_kv_tile(v_desc, v_smem.index(stage), v_ready.index(stage), b, hk, start, pages, LAST_PAGE, KV_LEN, BLOCK_N, PAGE)


# ---------------------------------------------------------------------------------------------
# Consumers: one warpgroup each.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _take_turn(turn, CONSUMER: gl.constexpr, count, PINGPONG: gl.constexpr):
    """Wait until it is this consumer's turn to issue GEMMs (its count-th turn)."""
    if PINGPONG:
        # consumer 0 goes first: its first wait is on the fresh barrier's completed phase 1
        first: gl.constexpr = 1 if CONSUMER == 0 else 0
        mbarrier.wait(turn.index(CONSUMER), (count & 1) ^ first)


@gluon.jit
def _pass_turn(turn, CONSUMER: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index((CONSUMER + 1) % NUM_CONSUMERS), count=1)


@gluon.jit
def _consumer_loop(state, q, k_smem, v_smem, bars, j_start, j_end, list_offset, lists, q_idx, mods,
                   KV_LEN, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr, FULL: gl.constexpr, CHECK_TAIL: gl.constexpr,
                   SPARSE: gl.constexpr, KV_BLOCK: gl.constexpr, CONSUMER: gl.constexpr,
                   PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, V_FENCE: gl.constexpr):
    """Steps j in [j_start, j_end) (tile j - list_offset of the partial or FULL list): issue
    S_j = Q K_j^T and O += P_{j-1} V_{j-1}, then S_j's softmax (the mask_mod on partial tiles).
    CHECK_TAIL (the tiles that may hold keys past KV_LEN) waits for the P V before the softmax: no
    overlap, but P_{j-1}'s registers are free for the tail's extra work (no spills).

    state = (acc, p_op, m_i, l_i, count): the output accumulator, P_{j-1} as the wgmma A operand,
    the row max and sum, and the number of GEMM turns taken."""
    acc, p_op, m_i, l_i, count = state
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    BLOCK_M: gl.constexpr = q.type.shape[0]
    for j in range(j_start, j_end):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        start = tile_start(lists, j - list_offset, FULL, SPARSE, KV_BLOCK, BLOCK_N)
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        _take_turn(turn, CONSUMER, count, PINGPONG)
        s = warpgroup_mma(q, ring_tile(k_smem, stage).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, ring_tile(v_smem, prev), acc, is_async=True)
        _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
        count += 1
        if CHECK_TAIL:  # tail tiles (a few per row): P V done first, its operand's registers free
            s, acc = warpgroup_mma_wait(0, deps=(s, acc))
        else:
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
        mbarrier.arrive(k_empty.index(stage), count=1)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_idx, start, mods, KV_LEN, SCORE_FN, MASK_FN,
                                           not FULL, CHECK_TAIL)
        # V_FENCE: waiting here for V_j (the next step's P V needs it anyway) ends the basic block;
        # without the barrier's spin loop between them, ptxas hoists the P V wait below above the
        # exponentials (SASS: WARPGROUP.DEPBAR right after the row max), and only the max overlaps.
        if V_FENCE:
            mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    return acc, p_op, m_i, l_i, count


@gluon.jit
def _attend(q, k_smem, v_smem, bars, lists, q_idx, mods, KV_LEN, n_partial, n_tiles,
            s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
            SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr, CONSUMER: gl.constexpr, BLOCK_N: gl.constexpr,
            HEAD_DIM: gl.constexpr, KV_BLOCK: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
            SPARSE: gl.constexpr, CHECK_N: gl.constexpr, PINGPONG: gl.constexpr, V_FENCE: gl.constexpr):
    """The pipeline over n_tiles >= 1 tiles (the first n_partial of them partial): (acc, m_i, l_i)."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    BLOCK_M: gl.constexpr = q.type.shape[0]
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    # -- prologue: S_0 and its softmax (tile 0 is partial when n_partial > 0, else the first full one) --
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    if SPARSE:
        first_partial = n_partial > 0
    else:
        first_partial: gl.constexpr = False
    if first_partial:
        start = tile_start(lists, 0, False, SPARSE, KV_BLOCK, BLOCK_N)
    else:
        start = tile_start(lists, 0, True, SPARSE, KV_BLOCK, BLOCK_N)
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn, CONSUMER, 0, PINGPONG)
    s = warpgroup_mma(q, ring_tile(k_smem, 0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_idx, start, mods, KV_LEN, SCORE_FN, MASK_FN,
                                       first_partial, CHECK_N)
    state = (acc, gl.convert_layout(p.to(q.dtype), p_layout), m_i, l_i, 1)

    # -- partial tiles (mask_mod), full tiles (none), the full tiles that may hold the key tail --
    TAIL_TILES: gl.constexpr = (KV_BLOCK // BLOCK_N) if CHECK_N else 0
    state = _consumer_loop(state, q, k_smem, v_smem, bars, 1, n_partial, 0, lists, q_idx, mods, KV_LEN,
                           s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, False, CHECK_N, SPARSE, KV_BLOCK,
                           CONSUMER, PINGPONG, NUM_CONSUMERS, BLOCK_N, STAGES, V_FENCE)
    full_start = gl.maximum(n_partial, 1)
    clean_end = gl.maximum(full_start, n_tiles - TAIL_TILES)
    state = _consumer_loop(state, q, k_smem, v_smem, bars, full_start, clean_end, n_partial, lists, q_idx,
                           mods, KV_LEN, s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, True, False, SPARSE,
                           KV_BLOCK, CONSUMER, PINGPONG, NUM_CONSUMERS, BLOCK_N, STAGES, V_FENCE)
    if CHECK_N:
        state = _consumer_loop(state, q, k_smem, v_smem, bars, clean_end, n_tiles, n_partial, lists, q_idx,
                               mods, KV_LEN, s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, True, True,
                               SPARSE, KV_BLOCK, CONSUMER, PINGPONG, NUM_CONSUMERS, BLOCK_N, STAGES, V_FENCE)
    acc, p_op, m_i, l_i, count = state

    # -- epilogue: the last P V --
    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    _take_turn(turn, CONSUMER, count, PINGPONG)
    acc = warpgroup_mma(p_op, ring_tile(v_smem, last), acc, is_async=True)
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods,
              SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr, CONSUMER: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, KV_BLOCK: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, SPARSE: gl.constexpr, HAS_FULL: gl.constexpr, CHECK_M: gl.constexpr,
              CHECK_N: gl.constexpr, PINGPONG: gl.constexpr, V_FENCE: gl.constexpr):
    """BLOCK_M query rows starting at q_start + CONSUMER * BLOCK_M: their out rows, lse and max_scores."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    b, h, hk, q_start = coords
    Q_LEN, KV_LEN, HQ = lens
    # wgmma layouts: one warpgroup, m64 x n(BLOCK_N or HEAD_DIM) x k16 instructions
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    row0 = q_start + CONSUMER * BLOCK_M
    q_pos = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
    if CHECK_M:
        q_pos = gl.minimum(q_pos, Q_LEN - 1)  # rows past Q_LEN: in range for the mods, never stored
    q_idx = gl.expand_dims(q_pos, 1)  # [BLOCK_M, 1]
    q = ring_tile(q_smem, CONSUMER)
    mbarrier.wait(q_ready.index(CONSUMER), 0)

    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    n_partial, n_tiles = tile_counts(lists, KV_LEN, SPARSE, HAS_FULL, KV_BLOCK, BLOCK_N)
    if n_tiles > 0:
        acc, m_i, l_i = _attend(q, k_smem, v_smem, bars, lists, q_idx, mods, KV_LEN, n_partial, n_tiles,
                                s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, CONSUMER, BLOCK_N, HEAD_DIM,
                                KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, CHECK_N, PINGPONG, V_FENCE)

    # -- write out (B, HQ, Q_LEN, E), lse (natural log) and max_scores (natural units) (B, HQ, Q_LEN) --
    out_ptr, lse_ptr, max_ptr = outs
    _, _, scale, qk_scale, _, _ = mods
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    if SCORE_FN is None:
        to_base2 = qk_scale  # m_i is in raw q.k units
        m_natural = m_i * scale
    else:
        to_base2 = 1.4426950408889634
        m_natural = m_i
    l_o = gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))
    out = (acc / gl.expand_dims(l_o, 1)).to(q.dtype)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    head_row = (b.to(gl.int64) * HQ + h) * Q_LEN  # first row of this (b, h) in (B * HQ * Q_LEN) rows
    offsets = (head_row + gl.expand_dims(rows, 1)) * HEAD_DIM + gl.expand_dims(cols, 0)
    gl.store(out_ptr + offsets, out, mask=gl.expand_dims(rows < Q_LEN, 1))
    lse = gl.where(empty, -float("inf"), (m_i * to_base2 + gl.log2(l_safe)) * 0.6931471805599453)
    stat_rows = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
    gl.store(lse_ptr + head_row + stat_rows, lse, mask=stat_rows < Q_LEN)
    gl.store(max_ptr + head_row + stat_rows, m_natural, mask=stat_rows < Q_LEN)


# Sizes are not specialized: new lengths or mask sizes reuse the compiled kernel.
@gluon.jit(do_not_specialize=["Q_LEN", "KV_LEN", "MASK_H", "MASK_NQ", "MASK_NKV", "LAST_PAGE"])
def _gluon_forward_kernel(
    # descriptors over q (B, HQ, Q_LEN, E), k and v (B, HKV, KV_LEN, E); out like q, lse and max_scores
    # (B, HQ, Q_LEN) contiguous
    q_desc, k_desc, v_desc, OUT, LSE, MAX_SCORES,
    # block tables (contiguous): counts (MB, MASK_H, MASK_NQ), indices (MB, MASK_H, MASK_NQ, MASK_NKV)
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, MASK_H, MASK_NQ, MASK_NKV,
    # paged K/V (PAGE > 0): k_desc / v_desc are over the caches (1, HKV, N_PAGES * PAGE, E); PAGE_TABLE
    # int32 (B, MAX_PAGES), LAST_PAGE = cdiv(KV_LEN, PAGE) - 1 (from the host: a value derived in the kernel
    # before the partitions split would be spilled across their register reallocation)
    PAGE_TABLE, page_table_stride, LAST_PAGE,
    # sizes and scale (qk_scale = scale * log2(e))
    Q_LEN, KV_LEN, HQ, scale, qk_scale,
    # compiled mods (SCORE_FN None: identity) and their runtime tuples
    SCORE_FN: gl.constexpr, SCORE_ARGS, MASK_FN: gl.constexpr, MASK_ARGS,
    # meta-parameters
    GQA_GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    KV_BLOCK: gl.constexpr, MASK_PER_BATCH: gl.constexpr, MASK_PER_HEAD: gl.constexpr,
    SPARSE: gl.constexpr, HAS_FULL: gl.constexpr, CHECK_M: gl.constexpr, CHECK_N: gl.constexpr,
    STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr, V_FENCE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PAGE: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    # longest rows first (causal-like masks): the tail of the grid is short work
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    h = gl.program_id(1)
    b = gl.program_id(2)
    q_start = pid_m * (NUM_CONSUMERS * BLOCK_M)
    coords = (b, h, h // GQA_GROUP, q_start)
    mods = (b, h, scale, qk_scale, SCORE_ARGS, MASK_ARGS)
    # this CTA's row of the block tables (its q block is pid_m: NUM_CONSUMERS * BLOCK_M == Q_BLOCK)
    tables = (KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, MASK_H, MASK_NQ, MASK_NKV)
    lists = row_lists(tables, b, h, pid_m, MASK_PER_BATCH, MASK_PER_HEAD)
    lens = (Q_LEN, KV_LEN, HQ)
    outs = (OUT, LSE, MAX_SCORES)

    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # every consumer reads every tile
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    fence_async_shared()
    bars = (q_ready, k_ready, k_empty, v_ready, v_empty, turn)

    # Tuples are written out in full: concatenating them here would turn constexprs into plain ints,
    # which warp_specialize cannot pass to a partition.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods, SCORE_FN, MASK_FN, 0,
                         BLOCK_M, BLOCK_N, HEAD_DIM, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, CHECK_M,
                         CHECK_N, PINGPONG, V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods, SCORE_FN, MASK_FN, 1,
                         BLOCK_M, BLOCK_N, HEAD_DIM, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, CHECK_M,
                         CHECK_N, PINGPONG, V_FENCE)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, coords, lists, PAGE_TABLE, page_table_stride,
                         LAST_PAGE, KV_LEN, BLOCK_M, BLOCK_N, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, PAGE)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.static_assert(NUM_CONSUMERS == 3, "two or three consumer warpgroups")
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods, SCORE_FN, MASK_FN, 0,
                         BLOCK_M, BLOCK_N, HEAD_DIM, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, CHECK_M,
                         CHECK_N, PINGPONG, V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods, SCORE_FN, MASK_FN, 1,
                         BLOCK_M, BLOCK_N, HEAD_DIM, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, CHECK_M,
                         CHECK_N, PINGPONG, V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, outs, coords, lists, lens, mods, SCORE_FN, MASK_FN, 2,
                         BLOCK_M, BLOCK_N, HEAD_DIM, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, CHECK_M,
                         CHECK_N, PINGPONG, V_FENCE)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, coords, lists, PAGE_TABLE, page_table_stride,
                         LAST_PAGE, KV_LEN, BLOCK_M, BLOCK_N, KV_BLOCK, STAGES, NUM_CONSUMERS, SPARSE, HAS_FULL, PAGE)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
# fmt: on


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def gluon_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score_mod: KernelMod,
    mask_mod: KernelMod,
    tables: BlockTables | None,
    scale: float,
    tiles: HopperTiles | None = None,
    target: DeviceLimits | None = None,
    warmup: bool = False,
    paged: PagedKV | None = None,
):
    """Block-sparse attention forward on Hopper, with the contract of ``kernels.forward.flex_forward``.

    Args:
        q: (B, Hq, Lq, E); k, v: (B, Hkv, Lkv, E), bf16 or fp16, E 64 or 128; any strides TMA can
            describe (unit feature stride, 16-byte aligned base and strides; no copies are made).
            ``Hq % Hkv == 0``: query head h reads kv head h // (Hq // Hkv).
        score_mod, mask_mod: ``KernelMod``s from ``flexattn.compiler`` (inlined at the one score/mask step).
        tables: the block lists (the kv side is read; q_block must be 128 or 192 and kv_block a
            multiple of 128), or None: no block mask, every key visited and no mask_mod.
        scale: multiplies q.k before score_mod; > 0.
        paged: K/V in a paged cache (``PagedKV``), or None (contiguous). Then k and v are the caches
            (1, Hkv, n_pages * page_size, E), read through ``paged.page_table`` by TMA, a box per
            page (the page size must divide the 128-key tile or be a multiple of it); the key length is
            ``paged.kv_len`` (logical positions: the mods and the tables see them), and the block
            tables keep the softmax off rows of unreserved pages (as for ``flex_forward``).
        tiles: the launch configuration (default ``choice.hopper_tiles``); ``target``: the GPU
            (default: the tensors' device). ``warmup=True`` compiles without launching (Triton's
            warmup: a driver naming sm_90 is all it needs; ``benchmarks/gluon_compile_report.py``).

    Returns:
        out (B, Hq, Lq, E) in q's dtype, lse (B, Hq, Lq) fp32 natural log, max_scores (B, Hq, Lq) fp32.

    Parallelization: one CTA per (q block, query head, batch element), grid ``(cdiv(Lq, rows), Hq,
    B)`` with ``rows = tiles.cta_rows`` (the mask's Q_BLOCK); q blocks in reverse order. Inside, a
    producer warp streams the K/V tiles of the q block's partial and full kv blocks through TMA and
    ``tiles.consumers`` warpgroups share them (see the module docstring).

        out, lse, max_scores = gluon_forward(q, k, v, score_mod=compile_score_mod(None),
                                             mask_mod=compile_mask_mod(causal), tables=mask.tables(), scale=0.125)
    """
    target = device_limits(q.device) if target is None else target
    dense = tables is None
    table_source = k if dense else tables.kv_num_blocks
    if paged is not None and dense:
        raise ValueError("the Gluon forward reads paged caches under a block mask (it keeps the softmax "
                         "off unreserved pages): pass the converted mask's tables")  # fmt: skip
    B, Hq, Lq, E, Lkv = check_call_kv(q, k, v, table_source, target, paged)
    page, page_args = 0, None
    if paged is not None:
        page = paged.page_size
        page_args = (paged.page_table, paged.page_table.stride(0), -(-Lkv // page) - 1)
    Hkv = k.shape[1]
    if q.dtype not in (torch.bfloat16, torch.float16) or v.shape[3] != E or E not in (64, 128):
        raise ValueError(f"the Gluon forward takes bf16/fp16 with E = Ev in (64, 128); got {q.dtype}, "
                         f"E={E}, Ev={v.shape[3]}")  # fmt: skip
    if not scale > 0:
        raise ValueError(f"the Gluon forward needs scale > 0; got {scale}")
    if tiles is None:
        tail = Lq % 128 != 0 or Lkv % 128 != 0
        tiles = hopper_tiles(head_dim=E, q_block=None if dense else tables.q_block, tail=tail)
    if page and tiles.block_n % page and page % tiles.block_n:
        raise ValueError(f"the Gluon forward reads pages of a size that divides its {tiles.block_n}-key tiles "
                         f"or is a multiple of them; got page_size={page}")  # fmt: skip
    if dense:
        kv_block, flags = tiles.block_n, {"MASK_PER_BATCH": 0, "MASK_PER_HEAD": 0}
        table_args = None  # filled below with stand-ins (SPARSE False: never read)
    else:
        check_block_tables(
            tables, "kv", B, Hq, triton.cdiv(Lq, tables.q_block), f"Lq={Lq} with Q_BLOCK={tables.q_block}"
        )
        if tables.q_block != tiles.cta_rows or tables.kv_block % tiles.block_n:
            raise ValueError(f"the Gluon forward covers one q block per CTA with {tiles.block_n}-key tiles: "
                             f"Q_BLOCK must be {tiles.cta_rows} and KV_BLOCK a multiple of {tiles.block_n}; "
                             f"got {tables.q_block}x{tables.kv_block}")  # fmt: skip
        kv_block = tables.kv_block
        table_args, flags = block_table_args(tables, "kv")
    out = torch.empty((B, Hq, Lq, E), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    max_scores = torch.empty_like(lse)
    if out.numel() == 0:
        return out, lse, max_scores
    if Lkv == 0:
        return out.zero_(), lse.fill_(float("-inf")), max_scores.fill_(float("-inf"))

    if dense:
        table_args = (lse, lse, lse, lse, 1, 1, 1)
    if paged is None:
        page_args = (lse, 0, 0)  # (never read: PAGE 0)
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    # K/V boxes: a tile, or with pages smaller than a tile one page of it
    q_box, kv_box = [1, 1, tiles.block_m, E], [1, 1, min(tiles.block_n, page or tiles.block_n), E]
    q_desc = TensorDescriptor.from_tensor(q, q_box, gl.NVMMASharedLayout.get_default_for(q_box, gdtype))
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_box, gdtype)
    k_desc = TensorDescriptor.from_tensor(k, kv_box, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v, kv_box, kv_layout)
    score_fn = None if score_mod.trivial else gluon_fn(score_mod.fn)
    args = (
        q_desc, k_desc, v_desc, out, lse, max_scores, *table_args, *page_args, Lq, Lkv, Hq, float(scale),
        float(scale) * LOG2E,
        score_fn, score_mod.args, gluon_fn(mask_mod.fn), mask_mod.args,
    )  # fmt: skip
    meta = dict(
        GQA_GROUP=Hq // Hkv, HEAD_DIM=E, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, KV_BLOCK=kv_block,
        **flags, SPARSE=not dense, HAS_FULL=dense or tables.has_full, CHECK_M=Lq % tiles.cta_rows != 0,
        CHECK_N=Lkv % kv_block != 0, STAGES=tiles.stages, NUM_CONSUMERS=tiles.consumers, PINGPONG=tiles.pingpong,
        V_FENCE=tiles.v_fence, CONSUMER_REGS=tiles.registers, PRODUCER_REGS=tiles.producer_regs, PAGE=page,
        num_warps=4,
    )  # fmt: skip
    grid = (triton.cdiv(Lq, tiles.cta_rows), Hq, B)
    if warmup:
        return _gluon_forward_kernel.warmup(*args, grid=grid, **meta)
    _gluon_forward_kernel[grid](*args, **meta)
    return out, lse, max_scores
