"""Hopper (sm_90a) forward attention in Gluon, FlashAttention-3 style: a spike (issue #16).

Glossary:
    B, H              batch and heads (q, k, v share the head count here: no GQA yet)
    L                 sequence length, the same for queries and keys; a multiple of the CTA's tiles
    E                 head dim of q, k and v (64 or 128)
    BLOCK_M           query rows of ONE consumer warpgroup (64); a CTA holds NUM_CONSUMERS of them
    BLOCK_N           keys per K/V tile
    STAGES            depth of the shared-memory ring of K/V tiles

How a CTA is organised (one CTA per (NUM_CONSUMERS * BLOCK_M query rows, batch*head)):
    producer  (1 warp, few registers): TMA loads of both consumers' Q tiles, then every K and V tile
              into a STAGES-deep ring; K and V each have a ready and an empty mbarrier per stage
              (empty counts NUM_CONSUMERS arrivals: every consumer reads every tile).
    consumers (NUM_CONSUMERS warpgroups: the default partition plus workers): each owns BLOCK_M query
              rows and runs the online softmax over the key tiles with warpgroup_mma:
                  S_j = Q K_j^T (smem x smem)       O += P_{j-1} V_{j-1} (registers x smem)
              Both GEMMs of a step are issued back to back, then the consumer waits for S_j only
              and does S_j's softmax while P_{j-1} V_{j-1} still runs (intra-warpgroup overlap).
              With PINGPONG the consumers take turns issuing their GEMMs (an mbarrier per
              consumer), so one warpgroup's softmax runs while the other's GEMMs occupy the tensor
              cores (inter-warpgroup ping-pong, as in FA3).
    registers: the producer warpgroup is given few registers (setmaxnreg), the consumers the rest.

Softmax in base 2: t = s * qk_scale with qk_scale = scale * log2(e) folded into one multiply;
lse = (m + log2 l) * ln 2 (natural log). Causal: key tiles above the diagonal are never loaded,
only tiles that straddle the diagonal evaluate the mask (``_score_mask``, the one place a compiled
mod would be inlined).
"""

from __future__ import annotations

import torch
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


# ---------------------------------------------------------------------------------------------
# The score/mask step: the one place a compiled score_mod / mask_mod would be inlined.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _score_mask(s, q_idx, kv_idx, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Raw q.k (fp32 [BLOCK_M, BLOCK_N]) -> base-2 scaled scores, -inf where masked.

    q_idx int32 [BLOCK_M, 1], kv_idx int32 [1, BLOCK_N] (absolute positions). MASKED is False on
    tiles known to be fully visible: no mask work there."""
    t = s * qk_scale
    if MASKED and CAUSAL:
        t = gl.where(q_idx >= kv_idx, t, -float("inf"))
    return t


# ---------------------------------------------------------------------------------------------
# Producer: TMA loads into the ring.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_blocks,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr):  # fmt: skip
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
def _take_turn(turn, CONSUMER: gl.constexpr, count, PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
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
def _softmax_step(s, m_i, l_i, q_idx, kv_idx, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """One tile's online-softmax update. Returns p (fp32, s's layout), alpha, m, l."""
    t = _score_mask(s, q_idx, kv_idx, qk_scale, MASKED, CAUSAL)
    m_new = gl.maximum(m_i, gl.max(t, 1))
    if MASKED:
        m_ref = gl.where(m_new == -float("inf"), 0.0, m_new)  # fully masked rows so far: p = 0, no NaN
    else:
        m_ref = m_new
    p = gl.exp2(t - gl.expand_dims(m_ref, 1))
    alpha = gl.exp2(m_i - m_ref)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _consumer_loop(acc, p_op, m_i, l_i, q, k_smem, v_smem, bars, j_start, j_end, count, q_idx, kv_base,
                   qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   CONSUMER: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
                   PINGPONG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr):  # fmt: skip
    """Steps j in [j_start, j_end): issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, softmax of S_j."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    BLOCK_M: gl.constexpr = q.type.shape[0]
    for j in range(j_start, j_end):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        prev = (j - 1) % STAGES
        prev_phase = ((j - 1) // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        _take_turn(turn, CONSUMER, count, PINGPONG, NUM_CONSUMERS)
        s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)  # fmt: skip
        mbarrier.wait(v_ready.index(prev), prev_phase)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
        count += 1
        s = warpgroup_mma_wait(1, deps=(s,))
        mbarrier.arrive(k_empty.index(stage), count=1)
        kv_idx = gl.expand_dims(kv_base + j * BLOCK_N, 0)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_idx, kv_idx, qk_scale, MASKED, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    return acc, p_op, m_i, l_i, count


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, bars, out_ptr, lse_ptr, bh, q_start, seq_len, qk_scale,
              n_blocks_all, CONSUMER: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):  # fmt: skip
    """BLOCK_M query rows starting at q_start + CONSUMER * BLOCK_M: out rows and lse."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    dtype: gl.constexpr = q_smem.dtype
    # wgmma layouts: one warpgroup, m64 x n(BLOCK_N or HEAD_DIM) x k16 instructions
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    row0 = q_start + CONSUMER * BLOCK_M
    q_idx = gl.expand_dims(row0 + gl.arange(0, BLOCK_M, layout=row_layout), 1)  # [BLOCK_M, 1]
    kv_base = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    if CAUSAL:
        n_blocks = gl.minimum(gl.cdiv(row0 + BLOCK_M, BLOCK_N), n_blocks_all)
        n_full = gl.minimum((row0 + 1) // BLOCK_N, n_blocks)  # tiles entirely at or below the diagonal
    else:
        n_blocks = n_blocks_all
        n_full = n_blocks

    q = q_smem.index(CONSUMER)
    mbarrier.wait(q_ready.index(CONSUMER), 0)

    # -- prologue: S_0 and its softmax (masked when causal: cheap, and right if tile 0 straddles) --
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    count = 0
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turn, CONSUMER, count, PINGPONG, NUM_CONSUMERS)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                      use_acc=False, is_async=True)  # fmt: skip
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    count += 1
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _softmax_step(
        s, m_i, l_i, q_idx, gl.expand_dims(kv_base, 0), qk_scale, CAUSAL, CAUSAL
    )
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    # -- main loop: unmasked tiles, then the tiles straddling the diagonal --
    acc, p_op, m_i, l_i, count = _consumer_loop(
        acc,
        p_op,
        m_i,
        l_i,
        q,
        k_smem,
        v_smem,
        bars,
        1,
        gl.maximum(n_full, 1),
        count,
        q_idx,
        kv_base,
        qk_scale,
        s_layout,
        o_layout,
        p_layout,
        CONSUMER,
        False,
        CAUSAL,
        PINGPONG,
        NUM_CONSUMERS,
        BLOCK_N,
        STAGES,
    )
    if CAUSAL:
        acc, p_op, m_i, l_i, count = _consumer_loop(
            acc,
            p_op,
            m_i,
            l_i,
            q,
            k_smem,
            v_smem,
            bars,
            gl.maximum(n_full, 1),
            n_blocks,
            count,
            q_idx,
            kv_base,
            qk_scale,
            s_layout,
            o_layout,
            p_layout,
            CONSUMER,
            True,
            CAUSAL,
            PINGPONG,
            NUM_CONSUMERS,
            BLOCK_N,
            STAGES,
        )

    # -- epilogue: the last P V --
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    _take_turn(turn, CONSUMER, count, PINGPONG, NUM_CONSUMERS)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
    count += 1
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    # -- tiles the producer loads for the other consumers only: release them, keep the turns going --
    for j in range(n_blocks, n_blocks_all):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage), count=1)
        _take_turn(turn, CONSUMER, count, PINGPONG, NUM_CONSUMERS)
        _pass_turn(turn, CONSUMER, PINGPONG, NUM_CONSUMERS)
        count += 1

    # -- write out (B, H, L, E) and lse (B, H, L), natural log --
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.expand_dims(l_o, 1)).to(dtype)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    base = bh.to(gl.int64) * seq_len
    offsets = (base + gl.expand_dims(rows, 1)) * HEAD_DIM + gl.expand_dims(cols, 0)
    gl.store(out_ptr + offsets, out)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + base + row0 + gl.arange(0, BLOCK_M, layout=row_layout), lse)


@gluon.jit
def _flash_fwd_ws_kernel(
    # descriptors over (B*H*L, E) views of q, k, v; out (B, H, L, E) and lse (B, H, L) contiguous
    q_desc, k_desc, v_desc, out_ptr, lse_ptr,
    # sizes and scale
    seq_len, qk_scale,
    # meta-parameters
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):  # fmt: skip
    NUM_CONSUMERS: gl.constexpr = 2
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
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    fence_async_shared()
    bars = (q_ready, k_ready, k_empty, v_ready, v_empty, turn)

    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    q_smem,
                    k_smem,
                    v_smem,
                    bars,
                    out_ptr,
                    lse_ptr,
                    bh,
                    q_start,
                    seq_len,
                    qk_scale,
                    n_blocks,
                    0,
                    BLOCK_M,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    NUM_CONSUMERS,
                    CAUSAL,
                    PINGPONG,
                ),
            ),
            (
                _consumer,
                (
                    q_smem,
                    k_smem,
                    v_smem,
                    bars,
                    out_ptr,
                    lse_ptr,
                    bh,
                    q_start,
                    seq_len,
                    qk_scale,
                    n_blocks,
                    1,
                    BLOCK_M,
                    BLOCK_N,
                    HEAD_DIM,
                    STAGES,
                    NUM_CONSUMERS,
                    CAUSAL,
                    PINGPONG,
                ),
            ),
            (
                _producer,
                (
                    q_desc,
                    k_desc,
                    v_desc,
                    q_smem,
                    k_smem,
                    v_smem,
                    bars,
                    q_row,
                    kv_row,
                    n_blocks,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                    NUM_CONSUMERS,
                ),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
DEFAULT_TILES = {64: (64, 128, 3), 128: (64, 128, 2)}  # E -> (BLOCK_M per consumer, BLOCK_N, STAGES)


def flash_forward_ws(q, k, v, *, causal=False, scale=None, block_m=None, block_n=None, stages=None,
                     pingpong=True, consumer_regs=240, producer_regs=24, warmup=False):  # fmt: skip
    """Attention forward on Hopper: q, k, v (B, H, L, E) bf16/fp16 -> out (B, H, L, E), lse (B, H, L) fp32.

    Parallelised over (L / (2 * block_m), B * H) CTAs; each CTA has two consumer warpgroups (block_m
    query rows each) and one producer warp. L must be a multiple of 2 * block_m and of block_n; E is
    64 or 128; k and v have q's shape (no GQA, no E != Ev in this spike). ``warmup=True`` compiles
    without launching (Triton's warmup; needs only a driver that names the target).

        out, lse = flash_forward_ws(q, k, v, causal=True)
    """
    B, H, L, E = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, L, E); got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bf16 or fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if E not in DEFAULT_TILES:
        raise ValueError(f"head dim {E} is not supported here (64 or 128)")
    d_m, d_n, d_s = DEFAULT_TILES[E]
    block_m, block_n, stages = block_m or d_m, block_n or d_n, stages or d_s
    cta_m = 2 * block_m
    if L % cta_m or L % block_n:
        raise ValueError(f"L={L} must be a multiple of 2*block_m={cta_m} and of block_n={block_n}")
    scale = E**-0.5 if scale is None else scale
    q2, k2, v2 = (t.contiguous().view(B * H * L, E) for t in (q, k, v))
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, E], gdtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, E], gdtype)
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, E], q_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, E], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [block_n, E], kv_layout)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = (L // cta_m, B * H)
    args = (q_desc, k_desc, v_desc, out, lse, L, scale * LOG2E)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=E, STAGES=stages, CAUSAL=causal,
                PINGPONG=pingpong, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
                num_warps=4)  # fmt: skip
    if warmup:
        return _flash_fwd_ws_kernel.warmup(*args, grid=grid, **meta)
    _flash_fwd_ws_kernel[grid](*args, **meta)
    return out, lse


def flops(B, H, L, E, causal):
    """Forward FLOPs (two GEMMs of 2*L*L*E each per head; half of it when causal)."""
    total = 4 * B * H * L * L * E
    return total / 2 if causal else total
