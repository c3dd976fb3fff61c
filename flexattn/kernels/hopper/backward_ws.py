"""Hopper (sm_90a) block-sparse attention backward in Gluon, warp-specialized: dK, dV and dQ in one kernel (issue #16).

Glossary (as ``kernels/backward.py``):
    B, HQ, HKV        batch, query heads, key/value heads (query head h reads kv head h // GQA_GROUP)
    Q_LEN, KV_LEN     sequence lengths (runtime values: new lengths do not recompile)
    E                 head dim of q, k and v (64 or 128; Ev == E)
    BLOCK_M           query rows per step (64): a Q / dO tile of the ring
    KEYS              keys of ONE consumer warpgroup (64); a CTA holds 2 * KEYS == KV_BLOCK keys
    Q_BLOCK, KV_BLOCK the BlockMask's block sizes: a CTA's keys are exactly one kv block (KV_BLOCK 128)
                      and BLOCK_M divides Q_BLOCK
    ROWS              Q_LEN rounded up to a multiple of every query tile: the rows of DELTA, LSE2 and the
                      fp32 dQ accumulator (padding rows: DELTA 0, LSE2 +inf, so p = 0 there)

How a CTA is organised (one CTA per (kv block, kv head, batch element)):
    producer  (1 warp): TMA loads of the CTA's K and V (once), then, for each query head of the GQA
              group and each q tile of the transposed block tables (partial, then full; without a
              block mask every q tile), the Q and dO tiles into a STAGES-deep ring (a ready and an
              empty mbarrier per stage and tensor; empty counts both consumers).
    consumers (2 warpgroups): each owns KEYS keys and their dK, dV accumulators (fp32, registers) and
              runs, per q tile, the five GEMMs with its keys along the rows (transposed scores):
                  S^T  = K_w Q^T          dP^T = V_w dO^T                       (smem x smem)
                  P^T  = exp2(S^T * qk_scale - LSE2)   dS^T = P^T (dP^T - DELTA)
                  dV_w += P^T dO          dK_w += dS^T Q                        (registers x smem)
                  dQ_w  = dS_w K_w        (dS^T through shared memory, transposed view)
              and adds dQ_w to the fp32 accumulator with atomics. The two warpgroups share the SM's
              tensor cores: one's exponentials overlap the other's GEMMs.

Math and outputs as ``kernels.backward.flex_backward``: dK = scale * sum_i dS^T Q, dV = sum_i P^T dO,
dQ = scale * sum_j dS K. Identity and additive score mods (``score + f(b, h, q, kv)``, whose dS is dM:
``KernelMod.bias_fn``) without captured tensors that need gradients; mask_mod on partial tiles only.
"""

from __future__ import annotations

import math

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

from flexattn.kernels.backward import _bwd_preprocess
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.checks import block_table_args, check_block_tables, check_qkv
from flexattn.kernels.device import DeviceLimits, device_limits, tma_compatible
from flexattn.kernels.hopper.gluon_mods import gluon_fn
from flexattn.kernels.hopper.tile_lists import ring_tile, row_lists, tile_counts, tile_start
from flexattn.kernels.hopper.tma_reduce import async_reduce_add
from flexattn.kernels.mods import KernelMod

LOG2E = 1.4426950408889634
BLOCK_M = 64  # query rows per step
TMA_DQ_COLS = 32  # tma_dq: columns of a dQ box (32: a 128-byte swizzled row; wider boxes are unswizzled)
KEYS = 64  # keys per consumer warpgroup (wgmma's M)
CTA_KEYS = 2 * KEYS
# launches whose shared-dS build crashed ptxas (see gluon_backward): they take the per-warpgroup form
PTXAS_FAILURES: set[tuple] = set()


# fmt: off
# ---------------------------------------------------------------------------------------------
# Producer: K and V once, then the Q and dO tiles of every (query head, q tile) into the ring.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, coords, tables, Q_LEN,
              GQA_GROUP: gl.constexpr, Q_BLOCK: gl.constexpr, STAGES: gl.constexpr, SPARSE: gl.constexpr,
              HAS_FULL: gl.constexpr, MASK_PER_BATCH: gl.constexpr, MASK_PER_HEAD: gl.constexpr):
    kv_ready, q_ready, q_empty, do_ready, do_empty, ds_full, ds_empty = bars
    b, hk, pid_n = coords
    M: gl.constexpr = q_desc.block_type.shape[2]
    W: gl.constexpr = k_desc.block_type.shape[2]
    mbarrier.expect(kv_ready, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, hk, pid_n * 2 * W + w * W, 0], kv_ready, k_smem.index(w))
        tma.async_copy_global_to_shared(v_desc, [b, hk, pid_n * 2 * W + w * W, 0], kv_ready, v_smem.index(w))
    it = 0
    for g in range(GQA_GROUP):
        hq = hk * GQA_GROUP + g
        lists = row_lists(tables, b, hq, pid_n, MASK_PER_BATCH, MASK_PER_HEAD)
        n_partial, n_tiles = tile_counts(lists, Q_LEN, SPARSE, HAS_FULL, Q_BLOCK, M)
        for j in range(n_tiles):
            if j < n_partial:
                start = tile_start(lists, j, False, SPARSE, Q_BLOCK, M)
            else:
                start = tile_start(lists, j - n_partial, True, SPARSE, Q_BLOCK, M)
            stage = it % STAGES
            phase = (it // STAGES) & 1
            # a fresh mbarrier counts as having completed phase 1: the first STAGES waits pass
            mbarrier.wait(q_empty.index(stage), phase ^ 1)
            mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, hq, start, 0], q_ready.index(stage), q_smem.index(stage))
            mbarrier.wait(do_empty.index(stage), phase ^ 1)
            mbarrier.expect(do_ready.index(stage), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [b, hq, start, 0], do_ready.index(stage), do_smem.index(stage))
            it += 1


# ---------------------------------------------------------------------------------------------
# Consumers: one warpgroup each, KEYS keys.
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _add_dq(dq, DQ_ACC, at, col0, buf, M: gl.constexpr, N: gl.constexpr, HEAD_DIM: gl.constexpr,
            dq_layout: gl.constexpr, VEC4: gl.constexpr, TMA: gl.constexpr):
    """Add dq [M, N] (fp32) to M rows of the accumulator, columns col0 + [0, N), atomically per element.
    TMA: DQ_ACC is (a descriptor over the (B * HQ * ROWS, E) rows, the staging tiles) and ``at`` the
    first row; dq goes to staging tile ``buf`` and one asynchronous bulk reduction adds it (the caller
    waits for the tile's previous reduction before this). Else per-thread reductions at ``at``, a scalar
    pointer to the first row (rows HEAD_DIM apart): VEC4 through a layout of 4 consecutive columns per
    thread (one v4 reduction instead of two v2 ones), else in the wgmma's own layout (2 consecutive
    columns per thread); a scalar 64-bit base and 32-bit offsets, constant per register, so they become
    immediate offsets."""
    if TMA:
        desc, stage = DQ_ACC
        tile = stage.index(buf)
        tile.store(dq)
        fence_async_shared()
        async_reduce_add(desc, [at, col0], tile)
    else:
        if VEC4:
            layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[128 // N, N // 4],
                                                    warps_per_cta=[4, 1], order=[1, 0])
            dq = gl.convert_layout(dq, layout)
        else:
            layout: gl.constexpr = dq_layout
        rows = gl.arange(0, M, layout=gl.SliceLayout(1, layout))
        cols = col0 + gl.arange(0, N, layout=gl.SliceLayout(0, layout))
        gl.atomic_add(at + gl.expand_dims(rows * HEAD_DIM, 1) + gl.expand_dims(cols, 0), dq, sem="relaxed")


@gluon.jit
def _step(state, k_w, v_w, q_smem, do_smem, k_smem, ds_smem, bars, start_m, it, kv_pos, kv_idx, hq, row0, mods, ptrs,
          Q_LEN, KV_LEN, s_layout: gl.constexpr, acc_layout: gl.constexpr, op_layout: gl.constexpr,
          BIAS_FN: gl.constexpr, MASK_FN: gl.constexpr, APPLY_MASK: gl.constexpr, CHECK_M: gl.constexpr,
          CHECK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, CONSUMER: gl.constexpr,
          SHARED_DS: gl.constexpr, DQ_VEC4: gl.constexpr, DQ_TMA: gl.constexpr,
          LATE_DP: gl.constexpr):
    """One q tile of BLOCK_M rows starting at start_m (ring slot ``it``): dV, dK += and dQ atomics."""
    dk, dv = state
    kv_ready, q_ready, q_empty, do_ready, do_empty, ds_full, ds_empty = bars
    b, scale, qk_scale, bias_args, mask_args = mods
    LSE2, DELTA, DQ_ACC = ptrs
    M: gl.constexpr = q_smem.shape[3]
    W: gl.constexpr = k_w.shape[0]
    stage = it % STAGES
    phase = (it // STAGES) & 1
    q_t = ring_tile(q_smem, stage)
    do_t = ring_tile(do_smem, stage)
    cols = start_m + gl.arange(0, M, layout=gl.SliceLayout(0, s_layout))
    lse2 = gl.load(LSE2 + row0 + cols)  # padded to ROWS: no masks

    mbarrier.wait(q_ready.index(stage), phase)
    s_t = warpgroup_mma(k_w, q_t.permute((1, 0)), gl.zeros([W, M], gl.float32, s_layout),
                        use_acc=False, is_async=True)
    # LATE_DP: dP^T's GEMM issued once P^T is computed, not during it (its 32 accumulator registers
    # a thread are then not live next to the mods' values; the other consumer fills the tensor cores)
    if not LATE_DP:
        mbarrier.wait(do_ready.index(stage), phase)
        dp_t = warpgroup_mma(v_w, do_t.permute((1, 0)), gl.zeros([W, M], gl.float32, s_layout),
                             use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(1, deps=(s_t,))
    else:
        s_t = warpgroup_mma_wait(0, deps=(s_t,))
    # base-2 scores, keys along rows: [KEYS, M]
    q_idx = gl.expand_dims(cols, 0)
    if CHECK_M:
        q_idx = gl.minimum(q_idx, Q_LEN - 1)  # rows past Q_LEN: LSE2 = +inf gives p = 0; the mods stay in range
    if BIAS_FN is None:
        m = s_t * qk_scale
    else:
        m = s_t * qk_scale + BIAS_FN(b, hq, q_idx, kv_idx, bias_args)
    if APPLY_MASK:
        m = gl.where(MASK_FN(b, hq, q_idx, kv_idx, mask_args), m, -float("inf"))
    if CHECK_N:
        m = gl.where(kv_pos < KV_LEN, m, -float("inf"))
    p_t = gl.exp2(m - gl.expand_dims(lse2, 0))
    # dS^T before the dV / dK GEMMs are issued: P^T (fp32) and dP^T die here, then only their 16-bit
    # operands are live next to the accumulators (the other warpgroup's GEMMs fill the tensor cores)
    delta = gl.load(DELTA + row0 + cols)  # loaded here: 16 registers a thread in the transposed layout
    if LATE_DP:
        mbarrier.wait(do_ready.index(stage), phase)
        dp_t = warpgroup_mma(v_w, do_t.permute((1, 0)), gl.zeros([W, M], gl.float32, s_layout),
                             use_acc=False, is_async=True)
    dp_t = warpgroup_mma_wait(0, deps=(dp_t,))
    dtype: gl.constexpr = q_t.dtype
    ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do_t, dv, is_async=True)
    dk = warpgroup_mma(gl.convert_layout(ds_t, op_layout), q_t, dk, is_async=True)
    # dQ (unscaled) += dS K, fp32 atomics into the (B, HQ, ROWS, E) accumulator (padded rows: no masks), in
    # feature halves at E128 (32 accumulator registers each, not 64). SHARED_DS: both consumers' dS^T go to
    # a shared slot and the step's owner (consumer it % 2) sums both key halves: one atomic per element and
    # CTA (the atomics bound this kernel: BENCHMARKS.md, fifteenth session); else each consumer adds its
    # own keys' part (twice the atomics; what runs where ptxas fails on the shared form).
    slot = it % 2
    if SHARED_DS:
        mbarrier.wait(ds_empty.index(slot), ((it // 2) & 1) ^ 1)  # the owner of step it - 2 is done with it
    ds_tile = ds_smem.index(2 * slot + CONSUMER)
    ds_tile.store(ds_t)
    fence_async_shared()
    dv = warpgroup_mma_wait(1, deps=(dv,))  # P^T's operand registers free before dQ's accumulator is live
    if SHARED_DS:
        mbarrier.arrive(ds_full.index(slot), count=1)
    if DQ_TMA:
        HALF: gl.constexpr = DQ_ACC[0].block_type.shape[1]  # dQ columns per GEMM: a TMA box
    else:
        HALF: gl.constexpr = 64  # dQ columns per GEMM
    DQ_SPLIT: gl.constexpr = HEAD_DIM // HALF
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HALF, 16])
    if DQ_TMA:  # DQ_ACC: a descriptor over the accumulator as (B * HQ * ROWS, E) rows, [M, HALF] boxes
        dq_at = (row0 + start_m).to(gl.int32)
    else:
        dq_at = DQ_ACC + (row0 + start_m) * HEAD_DIM
    dk = warpgroup_mma_wait(0, deps=(dk,))
    mbarrier.arrive(q_empty.index(stage), count=1)
    mbarrier.arrive(do_empty.index(stage), count=1)
    if SHARED_DS:
        if slot == CONSUMER:
            mbarrier.wait(ds_full.index(slot), (it // 2) & 1)
            if DQ_TMA:
                tma.store_wait(0)  # this consumer's staging tiles: read by its reductions two steps ago
            for part in gl.static_range(DQ_SPLIT):
                dq = gl.zeros([M, HALF], gl.float32, dq_layout)
                for w in gl.static_range(2):
                    dq = warpgroup_mma(ds_smem.index(2 * slot + w).permute((1, 0)),
                                       ring_tile(k_smem, w).slice(part * HALF, HALF, dim=1), dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq,))
                if part == DQ_SPLIT - 1:
                    mbarrier.arrive(ds_empty.index(slot), count=1)
                _add_dq(dq, DQ_ACC, dq_at, part * HALF, CONSUMER * DQ_SPLIT + part, M, HALF, HEAD_DIM, dq_layout,
                        DQ_VEC4, DQ_TMA)
    else:
        if DQ_TMA:
            tma.store_wait(0)  # this consumer's staging tiles: read by its reductions of the step before
        for part in gl.static_range(DQ_SPLIT):
            dq = warpgroup_mma(ds_tile.permute((1, 0)), k_w.slice(part * HALF, HALF, dim=1),
                               gl.zeros([M, HALF], gl.float32, dq_layout), use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq,))
            _add_dq(dq, DQ_ACC, dq_at, part * HALF, CONSUMER * DQ_SPLIT + part, M, HALF, HEAD_DIM, dq_layout,
                    DQ_VEC4, DQ_TMA)
    return dk, dv


@gluon.jit
def _loop(state, k_w, v_w, q_smem, do_smem, k_smem, ds_smem, bars, lists, j_start, j_end, list_offset, it, kv_pos, kv_idx,
          hq, row0, mods, ptrs, Q_LEN, KV_LEN, s_layout: gl.constexpr, acc_layout: gl.constexpr,
          op_layout: gl.constexpr, BIAS_FN: gl.constexpr, MASK_FN: gl.constexpr, FULL: gl.constexpr,
          CHECK_M: gl.constexpr, CHECK_N: gl.constexpr, SPARSE: gl.constexpr, Q_BLOCK: gl.constexpr,
          STAGES: gl.constexpr, HEAD_DIM: gl.constexpr, CONSUMER: gl.constexpr, SHARED_DS: gl.constexpr, DQ_VEC4: gl.constexpr, DQ_TMA: gl.constexpr,
          LATE_DP: gl.constexpr):
    """Steps j in [j_start, j_end): tile j - list_offset of the partial (mask_mod) or FULL list."""
    M: gl.constexpr = q_smem.shape[3]
    for j in range(j_start, j_end):
        start_m = tile_start(lists, j - list_offset, FULL, SPARSE, Q_BLOCK, M)
        state = _step(state, k_w, v_w, q_smem, do_smem, k_smem, ds_smem, bars, start_m, it + j, kv_pos, kv_idx, hq, row0,
                      mods, ptrs, Q_LEN, KV_LEN, s_layout, acc_layout, op_layout, BIAS_FN, MASK_FN, not FULL,
                      CHECK_M, CHECK_N, STAGES, HEAD_DIM, CONSUMER, SHARED_DS, DQ_VEC4, DQ_TMA, LATE_DP)
    return state


@gluon.jit
def _consumer(q_smem, do_smem, k_smem, v_smem, ds_smem, bars, coords, tables, lens, mods, ptrs, outs,
              BIAS_FN: gl.constexpr, MASK_FN: gl.constexpr, CONSUMER: gl.constexpr, HEAD_DIM: gl.constexpr,
              GQA_GROUP: gl.constexpr, Q_BLOCK: gl.constexpr, STAGES: gl.constexpr, SPARSE: gl.constexpr,
              HAS_FULL: gl.constexpr, CHECK_M: gl.constexpr, CHECK_N: gl.constexpr,
              MASK_PER_BATCH: gl.constexpr, MASK_PER_HEAD: gl.constexpr, SHARED_DS: gl.constexpr, DQ_VEC4: gl.constexpr, DQ_TMA: gl.constexpr,
          LATE_DP: gl.constexpr):
    """KEYS keys starting at pid_n * CTA_KEYS + CONSUMER * KEYS: their dK and dV rows, and dQ atomics."""
    kv_ready, q_ready, q_empty, do_ready, do_empty, ds_full, ds_empty = bars
    b, hk, pid_n = coords
    Q_LEN, KV_LEN, HQ, ROWS = lens
    M: gl.constexpr = q_smem.shape[3]
    W: gl.constexpr = k_smem.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    key0 = pid_n * 2 * W + CONSUMER * W
    kv_pos = gl.expand_dims(key0 + gl.arange(0, W, layout=gl.SliceLayout(1, s_layout)), 1)  # [KEYS, 1]
    kv_idx = kv_pos
    if CHECK_N:
        kv_idx = gl.minimum(kv_pos, KV_LEN - 1)
    k_w = ring_tile(k_smem, CONSUMER)
    v_w = ring_tile(v_smem, CONSUMER)
    mbarrier.wait(kv_ready, 0)

    state = (gl.zeros([W, HEAD_DIM], gl.float32, acc_layout), gl.zeros([W, HEAD_DIM], gl.float32, acc_layout))
    it = 0
    for g in range(GQA_GROUP):
        hq = hk * GQA_GROUP + g
        row0 = (b.to(gl.int64) * HQ + hq) * ROWS
        lists = row_lists(tables, b, hq, pid_n, MASK_PER_BATCH, MASK_PER_HEAD)
        n_partial, n_tiles = tile_counts(lists, Q_LEN, SPARSE, HAS_FULL, Q_BLOCK, M)
        state = _loop(state, k_w, v_w, q_smem, do_smem, k_smem, ds_smem, bars, lists, 0, n_partial, 0, it, kv_pos, kv_idx,
                      hq, row0, mods, ptrs, Q_LEN, KV_LEN, s_layout, acc_layout, op_layout, BIAS_FN, MASK_FN,
                      False, CHECK_M, CHECK_N, SPARSE, Q_BLOCK, STAGES, HEAD_DIM, CONSUMER, SHARED_DS, DQ_VEC4, DQ_TMA, LATE_DP)
        state = _loop(state, k_w, v_w, q_smem, do_smem, k_smem, ds_smem, bars, lists, n_partial, n_tiles, n_partial, it,
                      kv_pos, kv_idx, hq, row0, mods, ptrs, Q_LEN, KV_LEN, s_layout, acc_layout, op_layout, BIAS_FN,
                      MASK_FN, True, CHECK_M, CHECK_N, SPARSE, Q_BLOCK, STAGES, HEAD_DIM, CONSUMER, SHARED_DS, DQ_VEC4, DQ_TMA, LATE_DP)
        it += n_tiles
    dk, dv = state
    if DQ_TMA:
        tma.store_wait(0)  # the last reductions read their staging tiles before the CTA exits

    # -- dK (scaled) and dV rows of this warpgroup's keys, (B, HKV, KV_LEN, E) contiguous --
    DK, DV = outs
    _, scale, _, _, _ = mods
    HKV = HQ // GQA_GROUP
    keys = gl.arange(0, W, layout=gl.SliceLayout(1, acc_layout))
    feats = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    # a scalar 64-bit base and 32-bit offsets within the tile (64-bit ones would cost 2 registers each)
    first = ((b.to(gl.int64) * HKV + hk) * KV_LEN + key0) * HEAD_DIM
    offsets = gl.expand_dims(keys * HEAD_DIM, 1) + gl.expand_dims(feats, 0)
    in_range = gl.expand_dims(key0 + keys < KV_LEN, 1)
    gl.store(DK + first + offsets, (dk * scale).to(DK.dtype.element_ty), mask=in_range)
    gl.store(DV + first + offsets, dv.to(DV.dtype.element_ty), mask=in_range)


# Sizes are not specialized: new lengths or mask sizes reuse the compiled kernel.
@gluon.jit(do_not_specialize=["Q_LEN", "KV_LEN", "ROWS", "MASK_H", "MASK_NKV", "MASK_NQ"])
def _gluon_backward_kernel(
    # descriptors over q, dout (B, HQ, Q_LEN, E) and k, v (B, HKV, KV_LEN, E)
    q_desc, do_desc, k_desc, v_desc,
    # LSE2, DELTA fp32 (B, HQ, ROWS); DQ_ACC fp32 (B, HQ, ROWS, E) zeroed; DK, DV (B, HKV, KV_LEN, E) contiguous
    LSE2, DELTA, DQ_ACC, DK, DV,
    # transposed block tables (contiguous): counts (MB, MASK_H, MASK_NKV), indices (MB, MASK_H, MASK_NKV, MASK_NQ)
    Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, MASK_H, MASK_NKV, MASK_NQ,
    Q_LEN, KV_LEN, HQ, ROWS, scale, qk_scale,
    BIAS_FN: gl.constexpr, BIAS_ARGS, MASK_FN: gl.constexpr, MASK_ARGS,
    GQA_GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, Q_BLOCK: gl.constexpr,
    MASK_PER_BATCH: gl.constexpr, MASK_PER_HEAD: gl.constexpr, SPARSE: gl.constexpr, HAS_FULL: gl.constexpr,
    CHECK_M: gl.constexpr, CHECK_N: gl.constexpr, STAGES: gl.constexpr,
    SHARED_DS: gl.constexpr, DQ_VEC4: gl.constexpr, DQ_TMA: gl.constexpr, LATE_DP: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    M: gl.constexpr = q_desc.block_type.shape[2]
    W: gl.constexpr = k_desc.block_type.shape[2]
    pid_n = gl.program_id(0)
    hk = gl.program_id(1)
    b = gl.program_id(2)
    coords = (b, hk, pid_n)
    tables = (Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, MASK_H, MASK_NKV, MASK_NQ)
    lens = (Q_LEN, KV_LEN, HQ, ROWS)
    mods = (b, scale, qk_scale, BIAS_ARGS, MASK_ARGS)
    if DQ_TMA:  # DQ_ACC a descriptor of [M, COLS] fp32 boxes; a staging tile per box of each consumer's dQ tile
        COLS: gl.constexpr = DQ_ACC.block_type.shape[1]
        dq_stage = gl.allocate_shared_memory(gl.float32, [2 * (HEAD_DIM // COLS), M, COLS], DQ_ACC.layout)
        ptrs = (LSE2, DELTA, (DQ_ACC, dq_stage))
    else:
        ptrs = (LSE2, DELTA, DQ_ACC)
    outs = (DK, DV)

    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, M, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, W, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, W, HEAD_DIM], v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([W, M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [4, W, M], ds_layout)  # index 2 * slot + consumer
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=2)  # both consumers' dS^T stored
        mbarrier.init(ds_empty.index(i), count=1)  # the step's owner read them
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers read every tile
        mbarrier.init(do_empty.index(i), count=2)
    fence_async_shared()
    bars = (kv_ready, q_ready, q_empty, do_ready, do_empty, ds_full, ds_empty)

    gl.warp_specialize([
        (_consumer, (q_smem, do_smem, k_smem, v_smem, ds_smem, bars, coords, tables, lens, mods, ptrs, outs, BIAS_FN,
                     MASK_FN, 0, HEAD_DIM, GQA_GROUP, Q_BLOCK, STAGES, SPARSE, HAS_FULL, CHECK_M, CHECK_N,
                     MASK_PER_BATCH, MASK_PER_HEAD, SHARED_DS, DQ_VEC4, DQ_TMA, LATE_DP)),
        (_consumer, (q_smem, do_smem, k_smem, v_smem, ds_smem, bars, coords, tables, lens, mods, ptrs, outs, BIAS_FN,
                     MASK_FN, 1, HEAD_DIM, GQA_GROUP, Q_BLOCK, STAGES, SPARSE, HAS_FULL, CHECK_M, CHECK_N,
                     MASK_PER_BATCH, MASK_PER_HEAD, SHARED_DS, DQ_VEC4, DQ_TMA, LATE_DP)),
        (_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, bars, coords, tables, Q_LEN,
                     GQA_GROUP, Q_BLOCK, STAGES, SPARSE, HAS_FULL, MASK_PER_BATCH, MASK_PER_HEAD)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
# fmt: on


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def gluon_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    *,
    score_mod: KernelMod,
    mask_mod: KernelMod,
    tables: BlockTables | None,
    scale: float,
    stages: int = 2,
    shared_ds: bool = True,
    vec4: bool | None = None,
    tma_dq: bool = False,
    dq_box_cols: int = TMA_DQ_COLS,
    late_dp: bool = False,
    consumer_regs: int = 240,
    producer_regs: int = 24,
    target: DeviceLimits | None = None,
    warmup: bool = False,
):
    """Gradients (dq, dk, dv) of flex attention on Hopper, with the contract of ``kernels.backward.flex_backward``
    for the mods it takes (identity or additive score mods without captured tensors that need gradients).

    Args:
        q: (B, Hq, Lq, E); k, v: (B, Hkv, Lkv, E); out, dout (B, Hq, Lq, E): bf16 or fp16, E 64 or 128,
            unit feature stride (TMA). lse (natural log, fp32) and dlse (or None): (B, Hq, Lq).
        tables: the block lists with their transposed (q-side) view (kv_block 128, q_block a multiple
            of 64), or None: every pair visited, no mask_mod.
        scale: multiplies q.k before the score mod; > 0.
        stages: depth of the Q / dO ring; consumer_regs / producer_regs: setmaxnreg per thread.
        shared_ds: the two consumers share their dS^T tiles and take turns adding dQ (one atomic per
            element and CTA; where ptxas fails to build that form, the per-warpgroup one runs: each
            consumer adds its own keys' dQ). vec4: the atomics as 4-wide vector reductions through a
            layout conversion (default: at E64; at E128 ptxas fails on it). tma_dq: dQ by TMA bulk
            reductions of [64, 32] boxes staged in shared memory (``tma_reduce.async_reduce_add``:
            cp.reduce.async.bulk.tensor) instead of per-thread reductions; dq_box_cols: the boxes' columns
            (32: 128-byte swizzled rows; 64: unswizzled). late_dp: dP^T's GEMM issued after P^T is
            computed (fewer live registers next to the mods' values; not yet timed on a GPU).
        warmup: compile without launching (a driver naming sm_90 is all it needs).

    Returns:
        dq, dk, dv in the inputs' dtype, contiguous.

    Parallelization: one CTA per (128 keys, kv head, batch element), grid ``(cdiv(Lkv, 128), Hkv, B)``;
    the preprocess of ``flex_backward`` (DELTA, LSE2) runs first, dQ sums in an fp32 buffer by atomics
    and is scaled and cast at the end.
    """
    target = device_limits(q.device) if target is None else target
    if target.capability != (9, 0):
        raise ValueError(f"the Gluon backward runs on sm_90 (Hopper) GPUs; this device is {target.capability}: "
                         "use kernel_options BACKWARD_KERNEL='TRITON'")  # fmt: skip
    dense = tables is None
    B, Hq, Lq, E = check_qkv(q, k, v, k if dense else tables.kv_num_blocks, target)
    Hkv, Lkv = k.shape[1], k.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16) or v.shape[3] != E or E not in (64, 128):
        raise ValueError(f"the Gluon backward takes bf16/fp16 with E = Ev in (64, 128); got {q.dtype}, "
                         f"E={E}, Ev={v.shape[3]}")  # fmt: skip
    if not scale > 0:
        raise ValueError(f"the Gluon backward needs scale > 0; got {scale}")
    if tma_dq and (dq_box_cols not in (32, 64) or E % dq_box_cols):
        raise ValueError(f"dq_box_cols must be 32 or 64 and divide E={E}; got {dq_box_cols}")
    if not (score_mod.trivial or score_mod.bias_fn is not None) or score_mod.grad_captures:
        raise ValueError("the Gluon backward takes identity or additive score mods whose captured tensors need "
                         f"no gradient; got {score_mod.name}")  # fmt: skip
    q_block = BLOCK_M if dense else tables.q_block
    if not dense:
        if tables.kv_block != CTA_KEYS or tables.q_block % BLOCK_M:
            raise ValueError(f"the Gluon backward covers one kv block of {CTA_KEYS} keys per CTA in {BLOCK_M}-row q "
                             f"tiles: KV_BLOCK must be {CTA_KEYS} and Q_BLOCK a multiple of {BLOCK_M}; got "
                             f"{tables.q_block}x{tables.kv_block}")  # fmt: skip
        check_block_tables(tables, "kv", B, Hq, triton.cdiv(Lq, q_block), f"Lq={Lq} with Q_BLOCK={q_block}")
        check_block_tables(
            tables, "q", B, Hq, triton.cdiv(Lkv, CTA_KEYS), f"Lkv={Lkv} with KV_BLOCK={CTA_KEYS}"
        )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()

    rows = triton.cdiv(Lq, math.lcm(64, q_block)) * math.lcm(64, q_block)
    delta = torch.empty((B, Hq, rows), device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    dq_acc = torch.zeros((B, Hq, rows, E), device=q.device, dtype=torch.float32)
    if dense:
        table_args = (lse2, lse2, lse2, lse2, 1, 1, 1)
        flags = {"MASK_PER_BATCH": 0, "MASK_PER_HEAD": 0}
    else:
        table_args, flags = block_table_args(tables, "q")
    # TMA reads: a broadcast gradient (``out.sum().backward()``: stride 0) or unaligned strides get a copy
    q, k, v, dout = (
        t if tma_compatible(t, target) and 0 not in t.stride() else t.contiguous() for t in (q, k, v, dout)
    )
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_box, kv_box = [1, 1, BLOCK_M, E], [1, 1, KEYS, E]
    q_layout = gl.NVMMASharedLayout.get_default_for(q_box, gdtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for(kv_box, gdtype)
    descs = (
        TensorDescriptor.from_tensor(q, q_box, q_layout),
        TensorDescriptor.from_tensor(dout, q_box, q_layout),
        TensorDescriptor.from_tensor(k, kv_box, kv_layout),
        TensorDescriptor.from_tensor(v, kv_box, kv_layout),
    )
    dq_target = dq_acc
    if tma_dq:  # dQ by TMA bulk reductions of [64, dq_box_cols] fp32 boxes of the accumulator as 2-D rows
        dq_box = [BLOCK_M, dq_box_cols]
        dq_layout = (
            gl.NVMMASharedLayout.get_default_for(dq_box, gl.float32) if dq_box_cols * 4 <= 128
            else gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        )
        dq_target = TensorDescriptor.from_tensor(dq_acc.view(-1, E), dq_box, dq_layout)
    bias_fn = None if score_mod.trivial else gluon_fn(score_mod.bias_fn)
    args = (
        *descs, lse2, delta, dq_target, dk, dv, *table_args, Lq, Lkv, Hq, rows, float(scale), float(scale) * LOG2E,
        bias_fn, score_mod.args, gluon_fn(mask_mod.fn), mask_mod.args,
    )  # fmt: skip
    meta = dict(
        GQA_GROUP=Hq // Hkv, HEAD_DIM=E, Q_BLOCK=q_block, **flags, SPARSE=not dense,
        HAS_FULL=dense or tables.has_full, CHECK_M=Lq % q_block != 0, CHECK_N=Lkv % CTA_KEYS != 0, STAGES=stages,
        SHARED_DS=shared_ds, DQ_VEC4=E == 64 if vec4 is None else vec4, DQ_TMA=tma_dq, LATE_DP=late_dp,
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4,
    )  # fmt: skip
    grid = (triton.cdiv(Lkv, CTA_KEYS), Hkv, B)
    if warmup:
        return _gluon_backward_kernel.warmup(*args, grid=grid, **meta)
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    _bwd_preprocess[(rows // 64, Hq, B)](
        out, dout, lse, delta if dlse is None else dlse, delta, lse2, out.stride(), dout.stride(), Hq, Lq,
        rows, E, BLOCK=64, EV_PAD=E, HAS_DLSE=dlse is not None,
    )  # fmt: skip
    # ptxas (Triton 3.6's, sm_90a) segfaults on the shared-dS form for some E128 mods (a toolchain
    # failure, reproducible without a GPU: benchmarks/gluon_compile_report.py --backward); the
    # per-warpgroup form computes the same gradients with twice the dQ atomics. A failed build is not
    # cached by Triton, so the failure is remembered here (else every call would run ptxas again).
    failure_key = (bias_fn, mask_mod.fn, q.dtype, tuple(sorted(meta.items())), tma_dq and dq_box_cols)
    if meta["SHARED_DS"] and failure_key in PTXAS_FAILURES:
        meta["SHARED_DS"] = False
    try:
        _gluon_backward_kernel[grid](*args, **meta)
    except triton.runtime.errors.PTXASError:
        if not meta["SHARED_DS"]:
            raise
        PTXAS_FAILURES.add(failure_key)
        meta["SHARED_DS"] = False
        _gluon_backward_kernel[grid](*args, **meta)
    dq.copy_(dq_acc[:, :, :Lq].mul_(scale))
    return dq, dk, dv


__all__ = ["gluon_backward"]
