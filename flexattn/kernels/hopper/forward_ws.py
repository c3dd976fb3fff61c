"""Hopper (sm_90a) forward attention in Gluon, FlashAttention-3 style: a spike (issue #16).

Glossary:
    B, H              batch and heads (q, k, v share the head count here: no GQA yet)
    L                 sequence length, the same for queries and keys; a multiple of BLOCK_N
    E                 head dim of q, k and v (64 or 128)
    BLOCK_M           query rows of ONE consumer warpgroup (64); a CTA holds NUM_CONSUMERS of them
    BLOCK_N           keys per K/V tile (a power of two, as every Gluon tensor dimension)
    STAGES            depth of the shared-memory ring of K/V tiles

How a CTA is organised (one CTA per (NUM_CONSUMERS * BLOCK_M query rows, batch*head)):
    producer  (1 warp, few registers): TMA loads of the consumers' Q tiles, then every K and V tile
              into a STAGES-deep ring; K and V each have a ready and an empty mbarrier per stage
              (empty counts NUM_CONSUMERS arrivals: every consumer reads every tile).
    consumers (NUM_CONSUMERS = 2 or 3 warpgroups: the default partition plus workers): each owns
              BLOCK_M query rows and runs the online softmax over the key tiles with warpgroup_mma:
                  S_j = Q K_j^T (smem x smem)       O += P_{j-1} V_{j-1} (registers x smem)
              Both GEMMs of a step are issued back to back, then the consumer waits for S_j only
              and does S_j's softmax while P_{j-1} V_{j-1} still runs (intra-warpgroup overlap).
              With PINGPONG the consumers take turns issuing their GEMMs (an mbarrier per
              consumer, round robin), so one warpgroup's softmax runs while another's GEMMs occupy
              the tensor cores (inter-warpgroup ping-pong, as in FA3).
    registers: the producer warpgroup is given few registers (setmaxnreg), the consumers the rest.

Softmax in base 2 with qk_scale = scale * log2(e): the row max m is kept in the scores' own units
(raw q.k without a score mod) and p = exp2(s * qk_scale - m * qk_scale) is one FFMA per score;
lse = (m * qk_scale + log2 l) * ln 2 (natural log). Causal: key tiles above the diagonal are never
loaded, only tiles that straddle the diagonal evaluate the mask. ``_score_mask`` is the one place
compiled score/mask mods (flexattn's generated ``@triton.jit`` functions, called as they are) are
inlined.
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

LOG2E = 1.4426950408889634


# fmt: off
# ---------------------------------------------------------------------------------------------
# The score/mask step: the one place the compiled score_mod / mask_mod are inlined.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _score_mask(s, q_idx, kv_idx, mods, SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr,
                MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Raw q.k (fp32 [BLOCK_M, BLOCK_N]) -> (scores the softmax sees, -inf where masked; their base-2 multiplier).

    q_idx int32 [BLOCK_M, 1], kv_idx int32 [1, BLOCK_N] (absolute positions); mods = (b, h, scale,
    qk_scale, SCORE_ARGS, MASK_ARGS). The mods follow flexattn's calling convention
    (``flexattn/kernels/mods.py``): SCORE_FN(score, b, h, q_idx, kv_idx, SCORE_ARGS) on the scaled
    score, MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS) -> int1. Without a score mod the scores stay in
    raw q.k units and the multiplier is qk_scale = scale * log2(e) (folded into the exp2's FFMA).
    MASKED is False on tiles known to be fully visible (below the causal diagonal): no mask work."""
    b, h, scale, qk_scale, score_args, mask_args = mods
    if SCORE_FN is None:
        to_base2 = qk_scale
    else:
        s = SCORE_FN(s * scale, b, h, q_idx, kv_idx, score_args)
        to_base2 = 1.4426950408889634
    if MASKED:
        if MASK_FN is None:
            if CAUSAL:
                s = gl.where(q_idx >= kv_idx, s, -float("inf"))
        else:
            s = gl.where(MASK_FN(b, h, q_idx, kv_idx, mask_args), s, -float("inf"))
    return s, to_base2


@gluon.jit
def _softmax_step(s, m_i, l_i, q_idx, kv_idx, mods, SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr,
                  MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """One tile's online-softmax update. Returns p (fp32, s's layout), alpha, m, l.

    m_i is the running row max in the units _score_mask returns (its multiplier is positive, so
    max and scaling commute); p = exp2(s * c - m * c) is one FFMA and one MUFU.EX2 per score."""
    s, to_base2 = _score_mask(s, q_idx, kv_idx, mods, SCORE_FN, MASK_FN, MASKED, CAUSAL)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    if MASKED:
        m_ref = gl.where(m_new == -float("inf"), 0.0, m_new)  # rows fully masked so far: p = 0, no NaN
    else:
        m_ref = m_new
    m_scaled = m_ref * to_base2
    p = gl.exp2(s * to_base2 - gl.expand_dims(m_scaled, 1))
    alpha = gl.exp2(m_i * to_base2 - m_scaled)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


# ---------------------------------------------------------------------------------------------
# Producer: TMA loads into the ring.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_blocks,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr):
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + c * BLOCK_M, 0], q_ready.index(c), q_smem.index(c))
    for j in range(n_blocks):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        row = kv_row + j * BLOCK_N
        # a fresh mbarrier counts as having completed phase 1: the first STAGES waits pass
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(stage), v_smem.index(stage))


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
def _consumer_loop(state, q, k_smem, v_smem, bars, j_start, j_end, q_idx, kv_base, mods,
                   s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
                   CONSUMER: gl.constexpr, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, V_FENCE: gl.constexpr):
    """Steps j in [j_start, j_end): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, then S_j's softmax.

    state = (acc, p_op, m_i, l_i, count): the output accumulator, P_{j-1} as the wgmma A operand,
    the row max and sum, and the number of GEMM turns taken."""
    acc, p_op, m_i, l_i, count = state
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    BLOCK_M: gl.constexpr = q.type.shape[0]
    for j in range(j_start, j_end):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        _take_turn(turn, CONSUMER, count, PINGPONG)
        s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
        count += 1
        s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} may still run
        mbarrier.arrive(k_empty.index(stage), count=1)
        kv_idx = gl.expand_dims(kv_base + j * BLOCK_N, 0)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_idx, kv_idx, mods, SCORE_FN, MASK_FN, MASKED, CAUSAL)
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
def _consumer(q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks_all, mods,
              SCORE_FN: gl.constexpr, MASK_FN: gl.constexpr, CONSUMER: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
              V_FENCE: gl.constexpr):
    """BLOCK_M query rows starting at q_start + CONSUMER * BLOCK_M: their out rows and lse."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    dtype: gl.constexpr = q_smem.dtype
    # wgmma layouts: one warpgroup, m64 x n(BLOCK_N or HEAD_DIM) x k16 instructions
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    row0 = q_start + CONSUMER * BLOCK_M
    q_idx = gl.expand_dims(row0 + gl.arange(0, BLOCK_M, layout=row_layout), 1)  # [BLOCK_M, 1]
    kv_base = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    if CAUSAL:
        n_blocks = gl.minimum(gl.cdiv(row0 + BLOCK_M, BLOCK_N), n_blocks_all)
        n_full = gl.minimum((row0 + 1) // BLOCK_N, n_blocks)  # tiles entirely at or below the diagonal
    elif MASK_FN is None:
        n_blocks = n_blocks_all
        n_full = n_blocks
    else:  # a mask mod and no block classification in this spike: every tile evaluates it
        n_blocks = n_blocks_all
        n_full = 0
    HAS_MASK: gl.constexpr = CAUSAL or (MASK_FN is not None)

    q = q_smem.index(CONSUMER)
    mbarrier.wait(q_ready.index(CONSUMER), 0)

    # -- prologue: S_0 and its softmax (masked whenever any tile is: cheap, and right if tile 0 is) --
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn, CONSUMER, 0, PINGPONG)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_idx, gl.expand_dims(kv_base, 0), mods, SCORE_FN, MASK_FN,
                                       HAS_MASK, CAUSAL)
    state = (acc, gl.convert_layout(p.to(dtype), p_layout), m_i, l_i, 1)

    # -- main loop: fully visible tiles, then the tiles that need the mask --
    state = _consumer_loop(state, q, k_smem, v_smem, bars, 1, gl.maximum(n_full, 1), q_idx, kv_base, mods,
                           s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, False, CAUSAL,
                           CONSUMER, PINGPONG, NUM_CONSUMERS, BLOCK_N, STAGES, V_FENCE)
    if HAS_MASK:
        state = _consumer_loop(state, q, k_smem, v_smem, bars, gl.maximum(n_full, 1), n_blocks, q_idx, kv_base,
                               mods, s_layout, o_layout, p_layout, SCORE_FN, MASK_FN, True, CAUSAL,
                               CONSUMER, PINGPONG, NUM_CONSUMERS, BLOCK_N, STAGES, V_FENCE)
    acc, p_op, m_i, l_i, count = state

    # -- epilogue: the last P V --
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    _take_turn(turn, CONSUMER, count, PINGPONG)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    count += 1
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    # -- tiles the producer loads for the other consumer only (causal): release them, pass the turns --
    for j in range(n_blocks, n_blocks_all):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage), count=1)
        _take_turn(turn, CONSUMER, count, PINGPONG)
        _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
        count += 1

    # -- write out (B, H, L, E) and lse (B, H, L), natural log --
    b, h, scale, qk_scale, score_args, mask_args = mods
    if SCORE_FN is None:
        to_base2 = qk_scale  # m_i is in raw q.k units
    else:
        to_base2 = 1.4426950408889634
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    base = bh.to(gl.int64) * seq_len
    offsets = (base + gl.expand_dims(rows, 1)) * HEAD_DIM + gl.expand_dims(cols, 0)
    gl.store(out_ptr + offsets, out, mask=gl.expand_dims(rows < seq_len, 1))  # the last CTA may overhang L
    lse = (m_i * to_base2 + gl.log2(l_i)) * 0.6931471805599453
    lse_rows = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
    gl.store(lse_ptr + base + lse_rows, lse, mask=lse_rows < seq_len)


# Sizes are not specialized: a new length or head count reuses the compiled kernel.
@gluon.jit(do_not_specialize=["seq_len", "num_heads"])
def _flash_fwd_ws_kernel(
    # descriptors over (B*H*L, E) views of q, k, v; out (B, H, L, E) and lse (B, H, L) contiguous
    q_desc, k_desc, v_desc, out_ptr, lse_ptr,
    # sizes and scale (qk_scale = scale * log2(e))
    seq_len, num_heads, scale, qk_scale,
    # compiled mods (None: identity score / no mask beyond CAUSAL) and their runtime tuples
    SCORE_FN: gl.constexpr, SCORE_ARGS, MASK_FN: gl.constexpr, MASK_ARGS,
    # meta-parameters
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    NUM_CONSUMERS: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, V_FENCE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # longest rows first: the tail of the grid is short work
    bh = gl.program_id(1)
    q_start = pid_m * (NUM_CONSUMERS * BLOCK_M)
    q_row = bh * seq_len + q_start
    kv_row = bh * seq_len
    n_blocks = seq_len // BLOCK_N
    if CAUSAL:
        n_blocks = gl.minimum(gl.cdiv(q_start + NUM_CONSUMERS * BLOCK_M, BLOCK_N), n_blocks)
    mods = (bh // num_heads, bh % num_heads, scale, qk_scale, SCORE_ARGS, MASK_ARGS)

    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
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
    # Tuples are written out in full: concatenating them here would turn constexprs into plain ints,
    # which warp_specialize cannot pass to a partition.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks, mods,
                         SCORE_FN, MASK_FN, 0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG,
                         V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks, mods,
                         SCORE_FN, MASK_FN, 1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG,
                         V_FENCE)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_blocks,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.static_assert(NUM_CONSUMERS == 3, "two or three consumer warpgroups")
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks, mods,
                         SCORE_FN, MASK_FN, 0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG,
                         V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks, mods,
                         SCORE_FN, MASK_FN, 1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG,
                         V_FENCE)),
            (_consumer, (q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, n_blocks, mods,
                         SCORE_FN, MASK_FN, 2, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, NUM_CONSUMERS, CAUSAL, PINGPONG,
                         V_FENCE)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_blocks,
                         BLOCK_M, BLOCK_N, STAGES, NUM_CONSUMERS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
# fmt: on


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
# E -> (BLOCK_M per consumer, BLOCK_N, STAGES, ping-pong, consumer warpgroups): the fastest of the
# H200 runs of 2026-12-02 (B4 H16, bf16: E128 L8192 noop 617-620 TFLOP/s with two consumers and no
# ping-pong; E64 L16384 noop 512 with three consumers, two stages and ping-pong)
DEFAULT_TILES = {64: (64, 128, 2, True, 3), 128: (64, 128, 2, False, 2)}


def flash_forward_ws(q, k, v, *, causal=False, scale=None, score_mod=None, mask_mod=None, block_m=None,
                     block_n=None, stages=None, consumers=None, pingpong=None, v_fence=True, consumer_regs=None,
                     producer_regs=24, warmup=False):  # fmt: skip
    """Attention forward on Hopper: q, k, v (B, H, L, E) bf16/fp16 -> out (B, H, L, E), lse (B, H, L) fp32.

    Parallelised over (cdiv(L, consumers * block_m), B * H) CTAs; each CTA has ``consumers`` (2 or 3)
    consumer warpgroups of block_m query rows each and one producer warp; the last CTA's rows past L
    are computed on whatever the Q tile holds and not stored. L must be a multiple of block_n; E is
    64 or 128; k and v have q's shape (no GQA, no E != Ev in this spike). ``consumer_regs`` defaults
    to 240 with two consumers and 160 with three (setmaxnreg; the producer keeps ``producer_regs``).

    ``causal``: key tiles above the diagonal are skipped and only diagonal tiles are masked.
    ``score_mod`` / ``mask_mod``: compiled mods (``flexattn.kernels.mods.KernelMod``: ``.fn`` and
    ``.args``) or None, inlined at the kernel's one score/mask step. There are no block tables in
    this spike: with ``causal`` the mask mod runs on the diagonal tiles only (it must allow every
    pair below the diagonal, as the causal mask does), without it on every tile. ``v_fence``: wait
    for the next V tile right after the softmax, which keeps ptxas from hoisting the P V wait above
    the exponentials (see ``_consumer_loop``). ``warmup=True`` compiles without launching (Triton's
    warmup; needs only a driver that names the target).

        out, lse = flash_forward_ws(q, k, v, causal=True)
    """
    B, H, L, E = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, L, E); got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bf16 or fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if E not in DEFAULT_TILES:
        raise ValueError(f"head dim {E} is not supported here (64 or 128)")
    d_m, d_n, d_s, d_pp, d_c = DEFAULT_TILES[E]
    block_m, block_n, stages, consumers = block_m or d_m, block_n or d_n, stages or d_s, consumers or d_c
    pingpong = d_pp if pingpong is None else pingpong
    if consumers not in (2, 3):
        raise ValueError(f"consumers must be 2 or 3 (warpgroups per CTA); got {consumers}")
    if L % block_n or consumers * block_m > L:
        raise ValueError(f"L={L} must be a multiple of block_n={block_n} and at least consumers*block_m")
    cta_m = consumers * block_m
    # registers per thread: 64K per CTA over (consumers + 1) warpgroups, the producer's given back
    consumer_regs = consumer_regs or {2: 240, 3: 160}[consumers]
    scale = E**-0.5 if scale is None else scale
    if scale <= 0:
        raise ValueError(f"scale must be positive (the row max is kept in scaled units); got {scale}")
    q2, k2, v2 = (t.contiguous().view(B * H * L, E) for t in (q, k, v))
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, E], gdtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, E], gdtype)
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, E], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, E], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [block_n, E], kv_layout)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, cta_m), B * H)
    score_fn, score_args = (None, ()) if score_mod is None else (score_mod.fn, score_mod.args)
    mask_fn, mask_args = (None, ()) if mask_mod is None else (mask_mod.fn, mask_mod.args)
    args = (
        q_desc,
        k_desc,
        v_desc,
        out,
        lse,
        L,
        H,
        scale,
        scale * LOG2E,
        score_fn,
        score_args,
        mask_fn,
        mask_args,
    )
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=E, STAGES=stages, NUM_CONSUMERS=consumers, CAUSAL=causal,
                PINGPONG=pingpong, V_FENCE=v_fence, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
                num_warps=4)  # fmt: skip
    if warmup:
        return _flash_fwd_ws_kernel.warmup(*args, grid=grid, **meta)
    _flash_fwd_ws_kernel[grid](*args, **meta)
    return out, lse


def flops(B, H, L, E, causal):
    """Forward FLOPs (two GEMMs of 2*L*L*E each per head; half of it when causal)."""
    total = 4 * B * H * L * L * E
    return total / 2 if causal else total
