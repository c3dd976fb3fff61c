"""Backward kernels (FlashAttention-2 style) and their launcher ``flex_backward``.

Glossary (the letters every kernel below uses):
    B, HQ, HKV          batch, query heads, key/value heads; GQA_GROUP = HQ // HKV query heads per kv head
    Q_LEN, KV_LEN       sequence lengths of queries and keys (runtime values)
    E, EV               head dims of q/k and of v; E_PAD / EV_PAD: their power-of-two tile widths
    Q_BLOCK, KV_BLOCK   the BlockMask's block sizes (sparsity granularity)
    BLOCK_M1, BLOCK_N1  dK/dV kernel: BLOCK_N1 keys per program, BLOCK_M1 queries per step
    BLOCK_M2, BLOCK_N2  dQ kernel: BLOCK_M2 queries per program, BLOCK_N2 keys per step
    CHECK_M, CHECK_N    compile bounds checks on queries / keys in (only where a tile can overhang)
    ROWS                Q_LEN rounded up to a multiple of every query tile: the row count of DELTA and
                        LSE2, whose padding rows (DELTA = 0, LSE2 = +inf) let the kernels load them unmasked
    DELTA               rowsum(dO * O) - dLSE, fp32 (B, HQ, ROWS)
    LSE2                the forward's logsumexp in base 2, fp32 (B, HQ, ROWS); +inf on empty and padding
                        rows, so that p = exp2(s * log2e - LSE2) = 0 there
    FUSED_DQ            the dK/dV kernel also adds dS K into an fp32 dQ buffer (dq_mode "atomic")
    SCORE_IS_ADDITIVE   the score mod is score + f(b, h, q, kv): base-2 scores qk * scale * log2e + BIAS_FN
                        (compiler/additive.py), one FMA per score; dS = dM unless captures need gradients
    SCORE_IS_IDENTITY   the score mod returns its score: the scale folds into the exp2 multiplier and
                        dS = dM (no score-mod calls)
    TILE_GRAD           SCORE_GRAD_FN of the dK/dV kernel is the mod's TILE_GRAD_FN (kernels/mods.py): it also
                        takes the tile's first query and key positions and adds relative-position table
                        gradients once per diagonal

Math, per (b, hq, i, j) with s = (q . k) * scale and m = score_mod(s) (-inf where masked):
    p = exp(m - lse);  dp = dO . v;  dm = p * (dp - DELTA)
    ds = SCORE_GRAD_FN(s, ..., dm)   (dLoss/ds; also accumulates captured-tensor gradients)
    dV = sum_i p dO;  dK = scale * sum_i ds q;  dQ = scale * sum_j ds k

The user's mods are called at exactly one place per kernel (``_dkdv_step`` and ``_dq_step``).
The dK/dV kernel holds its tiles transposed (keys along rows, as in Triton's fused-attention
tutorial): it calls the mods with ``q_idx`` shaped ``[1, BLOCK_M1]``, ``kv_idx`` shaped
``[BLOCK_N1, 1]`` and a ``[BLOCK_N1, BLOCK_M1]`` score; mods are elementwise, so they broadcast
exactly as in the forward's layout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flexattn.kernels.backward_tiles import BackwardTiles, choose_backward_tiles
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.checks import block_table_args, check_block_tables, check_qkv
from flexattn.kernels.device import DeviceLimits, device_limits, dot_precision, tile_descriptors
from flexattn.kernels.tile_io import (
    clamp_tail,
    listed_tiles,
    load_rows,
    mask_row,
    sparse_tile_start,
    tile_source,
)
from flexattn.kernels.tiles import padded_head_dim
from flexattn.options import DEFAULT_OPTIONS

# Deterministic mode accumulates captured-tensor gradients as 64-bit fixed point: each contribution
# is scaled by 2**FIXED_POINT_BITS and truncated to an integer, so the sum is order independent.
# Resolution 2**-32 (about 2.3e-10) per contribution; the final gradient must stay below 2**31.
FIXED_POINT_BITS = 32

# fmt: off
# (kernel arguments are grouped by meaning, several per line)


# ----------------------------------------------------------------------------------------------
# Preprocess: DELTA = rowsum(dO * O) - dLSE and LSE2, one program per (BLOCK rows, h, b) of ROWS
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Q_LEN"])
def _bwd_preprocess(O, DO, LSE, DLSE, DELTA, LSE2, o_strides, do_strides, HQ, Q_LEN, ROWS, EV: tl.constexpr,
                    BLOCK: tl.constexpr, EV_PAD: tl.constexpr, HAS_DLSE: tl.constexpr):
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start = tl.program_id(0) * BLOCK
    rows = start + tl.arange(0, BLOCK)
    o = load_rows(tile_source(O, b, h, o_strides, False), b, h, start, (o_strides[2], o_strides[3]), Q_LEN, EV,
                  EV_PAD, BLOCK, True, False)
    do = load_rows(tile_source(DO, b, h, do_strides, False), b, h, start, (do_strides[2], do_strides[3]), Q_LEN, EV,
                   EV_PAD, BLOCK, True, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # 0 on padding rows (o, do load as 0)
    offsets = (b * HQ + h) * Q_LEN + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + offsets, mask=rows < Q_LEN, other=0.0)
    lse = tl.load(LSE + offsets, mask=rows < Q_LEN, other=float("-inf"))
    padded = (b * HQ + h) * ROWS + rows
    tl.store(DELTA + padded, delta)
    tl.store(LSE2 + padded, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634))


# ----------------------------------------------------------------------------------------------
# Shared by both kernels: one tile's scores and probabilities, in either layout
# ----------------------------------------------------------------------------------------------
@triton.jit
def _probabilities(qk, lse2, q_idx, kv_idx, q_pos, kv_pos, b, hq, Q_LEN, KV_LEN, scale,
                   SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
                   IS_FULL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
                   SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr, BIAS_FN: tl.constexpr):
    """``(s, p)`` of one tile from the raw ``qk = q . k``: s the score the mods see (natural units),
    p = exp2(score_mod(s) * log2e - LSE2), 0 where masked or out of range.

    Layout-agnostic: ``lse2``, the indices (``q_idx``, ``kv_idx``, wrapped into range for the mods)
    and the positions (``q_pos``, ``kv_pos``, for the range checks) come broadcastable to qk's shape:
    ``[1, M]`` / ``[N, 1]`` for the dK/dV kernel's transposed tile, ``[M, 1]`` / ``[1, N]`` for dQ's.
    """
    if SCORE_IS_IDENTITY:  # the scale folds into the base-2 multiplier: one multiply per score
        s = qk
        m = qk * (scale * 1.4426950408889634)
    elif SCORE_IS_ADDITIVE:  # score + f: the base-2 bias folds in too, one FMA per score (compiler/additive.py)
        s = qk * scale  # only the capture gradients could read it (an additive mod's dscore is dM)
        m = qk * (scale * 1.4426950408889634) + BIAS_FN(b, hq, q_idx, kv_idx, SCORE_ARGS)
    else:
        s = qk * scale
        m = SCORE_FN(s, b, hq, q_idx, kv_idx, SCORE_ARGS) * 1.4426950408889634
    if not IS_FULL:
        m = tl.where(MASK_FN(b, hq, q_idx, kv_idx, MASK_ARGS), m, float("-inf"))
    if CHECK_M:
        m = tl.where(q_pos < Q_LEN, m, float("-inf"))
    if CHECK_N:
        m = tl.where(kv_pos < KV_LEN, m, float("-inf"))
    return s, tl.math.exp2(m - lse2)


# ----------------------------------------------------------------------------------------------
# dK / dV: one program per (BLOCK_N1 keys, kv head, b); loops over the GQA_GROUP query heads of
# the group and, for each, over the query blocks of the transposed BlockMask (partial, then full).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(
    dk, dv, k, v, start_m, start_n, offs_n, b, hq,
    q_src, do_src, LSE2, DELTA, row0, q_strides, do_strides,  # this head's q / dO (tile_source), its LSE2 offset
    DQ_ACC, dq_strides, Q_LEN, KV_LEN, scale,
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_ARGS,
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_M1: tl.constexpr,
    IS_FULL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    GRAD_SCALE: tl.constexpr, FUSED_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr, BIAS_FN: tl.constexpr,
    TILE_GRAD: tl.constexpr,
):
    # -- BLOCK_M1 query rows (q transposed), their dO, LSE and DELTA
    local = tl.arange(0, BLOCK_M1)
    offs_m = start_m + local
    m64 = start_m.to(tl.int64)
    qT = load_rows(q_src, b, hq, start_m, q_strides, Q_LEN, E, E_PAD, BLOCK_M1, CHECK_M, USE_TMA, TRANSPOSED=True)
    do = load_rows(do_src, b, hq, start_m, do_strides, Q_LEN, EV, EV_PAD, BLOCK_M1, CHECK_M, USE_TMA)
    lse2 = tl.load(LSE2 + row0 + offs_m)  # padded to ROWS: no masks
    delta = tl.load(DELTA + row0 + offs_m)

    # -- scores and probabilities, keys along rows: [BLOCK_N1, BLOCK_M1]
    q_idx = clamp_tail(offs_m, Q_LEN, CHECK_M)[None, :]  # clamped only where a tile can overhang
    kv_idx = clamp_tail(offs_n, KV_LEN, CHECK_N)[:, None]
    sT, pT = _probabilities(
        tl.dot(k, qT, input_precision=DOT_PRECISION), lse2[None, :], q_idx, kv_idx, offs_m[None, :], offs_n[:, None],
        b, hq, Q_LEN, KV_LEN, scale, SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS,
        IS_FULL, CHECK_M, CHECK_N, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE, BIAS_FN,
    )

    # -- dV += P^T dO;  dP^T = V dO^T;  dM = P * (dP - DELTA)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dmT = pT * (dpT - delta[None, :])

    # -- through the score mod (captured-tensor gradients accumulate here), then dK += dS^T Q
    if SCORE_IS_IDENTITY:
        dsT = dmT
    else:
        dmT_scaled = dmT
        if GRAD_SCALE != 1.0:  # deterministic mode: fixed-point capture gradients (FIXED_POINT_BITS)
            dmT_scaled = dmT * GRAD_SCALE
        if TILE_GRAD:
            dsT = SCORE_GRAD_FN(sT, b, hq, q_idx, kv_idx, start_m, start_n, dmT_scaled, SCORE_ARGS, SCORE_GRAD_ARGS)
        else:
            dsT = SCORE_GRAD_FN(sT, b, hq, q_idx, kv_idx, dmT_scaled, SCORE_ARGS, SCORE_GRAD_ARGS)
        if GRAD_SCALE != 1.0:
            dsT = dsT * (1.0 / GRAD_SCALE)
    if (not IS_FULL) or CHECK_M or CHECK_N:
        dsT = tl.where(pT > 0.0, dsT, 0.0)  # masked, out of range or empty rows: exactly zero, never NaN
    dsT = dsT.to(qT.dtype)
    dk += tl.dot(dsT, tl.trans(qT), input_precision=DOT_PRECISION)

    # -- FUSED_DQ: dQ (unscaled) += dS K, added atomically to the fp32 accumulator
    if FUSED_DQ:
        offs_e = tl.arange(0, E_PAD)
        dq_ptrs = (DQ_ACC + b.to(tl.int64) * dq_strides[0] + hq.to(tl.int64) * dq_strides[1] + m64 * dq_strides[2]
                   + local[:, None] * dq_strides[2] + offs_e[None, :] * dq_strides[3])
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PRECISION)
        tl.atomic_add(dq_ptrs, dq, mask=(offs_m < Q_LEN)[:, None] & (offs_e < E)[None, :], sem="relaxed")
    return dk, dv


# Lengths and block counts change with the sequence length: not specialized, so new lengths reuse the
# compiled kernels. (q/k/v strides stay specialized: their divisibility enables wide loads.)
@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "MASK_H", "MASK_ROWS", "MASK_COLS"])
def _bwd_dkdv(
    Q, K, V, DO, LSE2, DELTA, DK, DV,  # tensors (b, h, position, feature); LSE2, DELTA (B, HQ, ROWS)
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    # transposed BlockMask (contiguous): counts (MB, MASK_H, NKV), indices (MB, MASK_H, NKV, NQ)
    Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, MASK_H, MASK_ROWS, MASK_COLS,
    DQ_ACC, dq_strides,  # fp32 (B, HQ, Q_LEN, E) dQ accumulator, used when FUSED_DQ
    HQ, Q_LEN, KV_LEN, ROWS, scale,
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_ARGS,
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, GQA_GROUP: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    MASK_PER_BATCH: tl.constexpr, MASK_PER_HEAD: tl.constexpr,
    HAS_FULL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
    GRAD_SCALE: tl.constexpr, FUSED_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr,
    BIAS_FN: tl.constexpr, TILE_GRAD: tl.constexpr,
):
    hk = tl.program_id(1)
    b = tl.program_id(2)
    start_n = tl.program_id(0) * BLOCK_N1
    local = tl.arange(0, BLOCK_N1)
    offs_n = start_n + local

    # -- this program's keys and values stay in registers for the whole loop
    b64, hk64, n64 = b.to(tl.int64), hk.to(tl.int64), start_n.to(tl.int64)
    k = load_rows(tile_source(K, b, hk, k_strides, False), b, hk, start_n, (k_strides[2], k_strides[3]), KV_LEN, E,
                  E_PAD, BLOCK_N1, CHECK_N, False)
    v = load_rows(tile_source(V, b, hk, v_strides, False), b, hk, start_n, (v_strides[2], v_strides[3]), KV_LEN, EV,
                  EV_PAD, BLOCK_N1, CHECK_N, False)
    dk = tl.zeros([BLOCK_N1, E_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, EV_PAD], dtype=tl.float32)

    # -- sum over the GQA_GROUP query heads of the group (no atomics on dK / dV), partial then full blocks
    kv_block = start_n // KV_BLOCK
    for g in range(GQA_GROUP):
        hq = hk * GQA_GROUP + g
        q_src = tile_source(Q, b, hq, q_strides, USE_TMA)  # USE_TMA: descriptors over the whole tensors
        do_src = tile_source(DO, b, hq, do_strides, USE_TMA)
        row0 = (b64 * HQ + hq) * ROWS
        list_row = mask_row(b, hq, kv_block, MASK_H, MASK_ROWS, MASK_PER_BATCH, MASK_PER_HEAD)
        for full in tl.static_range(2 if HAS_FULL else 1):
            idx_row, num_tiles = listed_tiles(Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, list_row, MASK_COLS, full,
                                              Q_BLOCK, BLOCK_M1)
            for i in range(0, num_tiles):
                start_m = sparse_tile_start(idx_row, i, 1, Q_BLOCK, BLOCK_M1)
                dk, dv = _dkdv_step(
                    dk, dv, k, v, start_m, start_n, offs_n, b, hq, q_src, do_src, LSE2, DELTA, row0,
                    (q_strides[2], q_strides[3]), (do_strides[2], do_strides[3]), DQ_ACC, dq_strides,
                    Q_LEN, KV_LEN, scale, SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, SCORE_GRAD_FN, SCORE_GRAD_ARGS,
                    E, EV, E_PAD, EV_PAD, BLOCK_M1, full == 1, CHECK_M, CHECK_N, GRAD_SCALE, FUSED_DQ, DOT_PRECISION,
                    USE_TMA, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE, BIAS_FN, TILE_GRAD,
                )

    # -- write dK (scaled) and dV
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    dk_ptrs = (DK + b64 * dk_strides[0] + hk64 * dk_strides[1] + n64 * dk_strides[2] + local[:, None] * dk_strides[2]
               + offs_e[None, :] * dk_strides[3])
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=(offs_n < KV_LEN)[:, None] & (offs_e < E)[None, :])
    dv_ptrs = (DV + b64 * dv_strides[0] + hk64 * dv_strides[1] + n64 * dv_strides[2] + local[:, None] * dv_strides[2]
               + offs_ev[None, :] * dv_strides[3])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n < KV_LEN)[:, None] & (offs_ev < EV)[None, :])


# ----------------------------------------------------------------------------------------------
# dQ: one program per (BLOCK_M2 queries, query head, b); loops over the kv blocks of the
# BlockMask (partial, then full), recomputing P and dP.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, offs_m, start_n, b, hq,
    k_src, v_src, k_strides, v_strides, Q_LEN, KV_LEN, scale,  # this kv head's K / V (tile_source)
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_ARGS,
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, GQA_GROUP: tl.constexpr,
    BLOCK_N2: tl.constexpr, IS_FULL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr,
    BIAS_FN: tl.constexpr,
):
    # -- BLOCK_N2 keys and values, transposed
    offs_n = start_n + tl.arange(0, BLOCK_N2)
    hk = hq // GQA_GROUP
    kT = load_rows(k_src, b, hk, start_n, k_strides, KV_LEN, E, E_PAD, BLOCK_N2, CHECK_N, USE_TMA, TRANSPOSED=True)
    vT = load_rows(v_src, b, hk, start_n, v_strides, KV_LEN, EV, EV_PAD, BLOCK_N2, CHECK_N, USE_TMA, TRANSPOSED=True)

    # -- scores and probabilities: [BLOCK_M2, BLOCK_N2]
    q_idx = clamp_tail(offs_m, Q_LEN, CHECK_M)[:, None]
    kv_idx = clamp_tail(offs_n, KV_LEN, CHECK_N)[None, :]
    s, p = _probabilities(
        tl.dot(q, kT, input_precision=DOT_PRECISION), lse2[:, None], q_idx, kv_idx, offs_m[:, None], offs_n[None, :],
        b, hq, Q_LEN, KV_LEN, scale, SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS,
        IS_FULL, CHECK_M, CHECK_N, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE, BIAS_FN,
    )

    # -- dP = dO V^T;  dM = P * (dP - DELTA);  through the score mod;  dQ += dS K
    dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
    dm = p * (dp - delta[:, None])
    if SCORE_IS_IDENTITY:
        ds = dm
    else:
        ds = SCORE_GRAD_FN(s, b, hq, q_idx, kv_idx, dm, SCORE_ARGS, SCORE_GRAD_ARGS)
    if (not IS_FULL) or CHECK_M or CHECK_N:
        ds = tl.where(p > 0.0, ds, 0.0)
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "MASK_H", "MASK_ROWS", "MASK_COLS"])
def _bwd_dq(
    Q, K, V, DO, LSE2, DELTA, DQ,  # tensors (b, h, position, feature); LSE2, DELTA (B, HQ, ROWS)
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    # BlockMask (contiguous): counts (MB, MASK_H, NQ), indices (MB, MASK_H, NQ, NKV)
    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, MASK_H, MASK_ROWS, MASK_COLS,
    HQ, Q_LEN, KV_LEN, ROWS, scale,
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr, SCORE_GRAD_ARGS,  # here: () (the dK/dV kernel owns the capture grads)
    E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr, GQA_GROUP: tl.constexpr,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    MASK_PER_BATCH: tl.constexpr, MASK_PER_HEAD: tl.constexpr,
    HAS_FULL: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr,
    BIAS_FN: tl.constexpr,
):
    hq = tl.program_id(1)
    b = tl.program_id(2)
    hk = hq // GQA_GROUP
    b64, hq64 = b.to(tl.int64), hq.to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M2
    local = tl.arange(0, BLOCK_M2)
    offs_m = start_m + local
    m64 = start_m.to(tl.int64)

    # -- this program's queries, dO, LSE and DELTA stay in registers
    q = load_rows(tile_source(Q, b, hq, q_strides, False), b, hq, start_m, (q_strides[2], q_strides[3]), Q_LEN, E,
                  E_PAD, BLOCK_M2, CHECK_M, False)
    do = load_rows(tile_source(DO, b, hq, do_strides, False), b, hq, start_m, (do_strides[2], do_strides[3]), Q_LEN,
                   EV, EV_PAD, BLOCK_M2, CHECK_M, False)
    row0 = (b64 * HQ + hq) * ROWS
    lse2 = tl.load(LSE2 + row0 + offs_m)  # padded to ROWS: no masks
    delta = tl.load(DELTA + row0 + offs_m)
    dq = tl.zeros([BLOCK_M2, E_PAD], dtype=tl.float32)

    # -- partial kv blocks, then full ones
    k_src = tile_source(K, b, hk, k_strides, USE_TMA)  # USE_TMA: descriptors over the whole tensors
    v_src = tile_source(V, b, hk, v_strides, USE_TMA)
    list_row = mask_row(b, hq, start_m // Q_BLOCK, MASK_H, MASK_ROWS, MASK_PER_BATCH, MASK_PER_HEAD)
    for full in tl.static_range(2 if HAS_FULL else 1):
        idx_row, num_tiles = listed_tiles(KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX, list_row, MASK_COLS, full,
                                          KV_BLOCK, BLOCK_N2)
        for i in range(0, num_tiles):
            start_n = sparse_tile_start(idx_row, i, 1, KV_BLOCK, BLOCK_N2)
            dq = _dq_step(
                dq, q, do, lse2, delta, offs_m, start_n, b, hq, k_src, v_src, (k_strides[2], k_strides[3]),
                (v_strides[2], v_strides[3]), Q_LEN, KV_LEN, scale,
                SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, SCORE_GRAD_FN, SCORE_GRAD_ARGS,
                E, EV, E_PAD, EV_PAD, GQA_GROUP, BLOCK_N2, full == 1, CHECK_M, CHECK_N, DOT_PRECISION, USE_TMA,
                SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE, BIAS_FN,
            )

    offs_e = tl.arange(0, E_PAD)
    dq_ptrs = (DQ + b64 * dq_strides[0] + hq64 * dq_strides[1] + m64 * dq_strides[2] + local[:, None] * dq_strides[2]
               + offs_e[None, :] * dq_strides[3])
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < Q_LEN)[:, None] & (offs_e < E)[None, :])


# fmt: on
# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def flex_backward(
    q, k, v, out, lse, dout, dlse, *, score_mod, mask_mod, tables: BlockTables, scale, options=None,
    grad_buffers=(), dq_mode=None, tiles: BackwardTiles | None = None, target: DeviceLimits | None = None,
):  # fmt: skip
    """Gradients of flex attention with respect to q, k, v and the score mod's captured tensors.

    Shapes: ``q (B, HQ, Q_LEN, E)``, ``k (B, HKV, KV_LEN, E)``, ``v (B, HKV, KV_LEN, EV)``,
    ``out``/``dout`` ``(B, HQ, Q_LEN, EV)`` (any strides), ``lse`` (natural log, fp32) and ``dlse``
    (or None) ``(B, HQ, Q_LEN)``. ``score_mod``/``mask_mod`` are ``KernelMod``s; ``tables`` the
    ``BlockTables`` (int32 ``(MB, MH, ...)`` with MB in {1, B}, MH in {1, HQ}), the transposed
    (q-side) view included. ``grad_buffers``: fp32 tensors shaped like ``score_mod.grad_captures``;
    the captured-tensor gradients are *added* to them. ``dq_mode``: "separate" or "atomic" (see
    ``backward_tiles``), None for the default. ``tiles`` (explicit ``BackwardTiles``) and ``target``
    (the GPU to plan for, default the tensors' device) let tools and tests steer the launch.
    Returns ``(dq, dk, dv)`` in the inputs' dtypes, each laid out as ``torch.empty_like`` of its input.

    Parallelization: up to three launches. (1) ``DELTA = rowsum(dO * O) - dLSE`` and the base-2 LSE,
    one program per (64 rows, h, b), into (B, HQ, ROWS) buffers whose padding rows let (2) and (3)
    load them unmasked. (2) dK/dV: one program per (BLOCK_N1 keys, kv head, b) that loops over the GQA_GROUP
    query heads of its group and, for each, the query blocks of the transposed BlockMask; dK and dV
    stay in registers (no atomics) and the program owns the captured-tensor gradients (atomics in
    the mod's gradient function; with ``options.deterministic`` 64-bit fixed-point atomics, which
    are order independent and so bitwise reproducible). (3) dQ: one program per (BLOCK_M2 queries,
    query head, b) over the kv blocks, recomputing P and dP; with dq_mode "atomic" it is skipped and
    launch (2) adds dS K into an fp32 buffer instead.

    Example::

        dq, dk, dv = flex_backward(q, k, v, out, lse, dout, None, score_mod=score, mask_mod=mask,
                                   tables=complete_q_side(mask.tables()), scale=q.shape[-1] ** -0.5,
                                   options=KernelOptions())
    """
    target = device_limits(q.device) if target is None else target
    options = DEFAULT_OPTIONS if options is None else options
    q_block, kv_block = tables.q_block, tables.kv_block
    _check_inputs(q, k, v, out, lse, dout, dlse, tables, score_mod, grad_buffers, target)
    B, HQ, Q_LEN, E = q.shape
    _, HKV, KV_LEN, EV = v.shape
    if tiles is None:
        tiles = choose_backward_tiles(
            E,
            EV,
            q.dtype,
            q_block,
            kv_block,
            target.capability,
            options,
            dq_mode,
            light_score=score_mod.light,
        )
    pads = {"E_PAD": padded_head_dim(E), "EV_PAD": padded_head_dim(EV)}
    meta = {
        "E": E, "EV": EV, **pads, "GQA_GROUP": HQ // HKV, "Q_BLOCK": q_block, "KV_BLOCK": kv_block,
        "HAS_FULL": tables.has_full, "DOT_PRECISION": dot_precision(q.dtype),
        "num_warps": tiles.num_warps, "num_stages": tiles.num_stages,
        "SCORE_IS_IDENTITY": score_mod.trivial,
        "SCORE_IS_ADDITIVE": score_mod.bias_fn is not None, "BIAS_FN": score_mod.bias_fn,
    }  # fmt: skip
    lse = lse.contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # laid out like k, v (what fake kernels promise)

    # (1) DELTA and LSE2, padded to ROWS (a multiple of every query tile) so the kernels load them unmasked
    rows = _padded_rows(Q_LEN, q_block, tiles)
    delta = torch.empty((B, HQ, rows), device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    _bwd_preprocess[(rows // 64, HQ, B)](
        out, dout, lse, delta if dlse is None else dlse, delta, lse2, out.stride(), dout.stride(), HQ, Q_LEN,
        rows, EV, BLOCK=64, EV_PAD=pads["EV_PAD"], HAS_DLSE=dlse is not None,
    )  # fmt: skip

    # (2) dK, dV and the captured-tensor gradients (and dQ with dq_mode "atomic")
    grad_scale = 1.0
    buffers = tuple(grad_buffers)
    if options.deterministic and buffers:
        grad_scale = float(2**FIXED_POINT_BITS)
        buffers = tuple(torch.zeros(g.shape, device=g.device, dtype=torch.int64) for g in grad_buffers)
    fused_dq = tiles.dq_mode == "atomic"
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fused_dq else torch.empty_like(q)
    table_args, flags = block_table_args(tables, "q")
    descriptors = None
    if tiles.use_tma and not fused_dq:
        descriptors = tile_descriptors(((q, pads["E_PAD"]), (dout, pads["EV_PAD"])), tiles.BLOCK_M1, target)
    q_src, dout_src = descriptors or (q, dout)
    tile_grad = score_mod.tile_grad_fn is not None and bool(buffers)  # per-diagonal table gradients
    _bwd_dkdv[(triton.cdiv(KV_LEN, tiles.BLOCK_N1), HKV, B)](
        q_src, k, v, dout_src, lse2, delta, dk, dv, q.stride(), k.stride(), v.stride(), dout.stride(), dk.stride(),
        dv.stride(), *table_args, dq, dq.stride(), HQ, Q_LEN, KV_LEN, rows, scale,
        score_mod.fn, score_mod.args, mask_mod.fn, mask_mod.args,
        score_mod.tile_grad_fn if tile_grad else score_mod.grad_fn, score_mod.grad_args(buffers),
        BLOCK_M1=tiles.BLOCK_M1, BLOCK_N1=tiles.BLOCK_N1, CHECK_M=Q_LEN % q_block != 0,
        CHECK_N=KV_LEN % tiles.BLOCK_N1 != 0, GRAD_SCALE=grad_scale, FUSED_DQ=fused_dq, USE_TMA=descriptors is not None,
        TILE_GRAD=tile_grad, **flags,
        **meta, **({"maxnreg": tiles.max_registers} if tiles.max_registers else {}),
    )  # fmt: skip
    if grad_scale != 1.0:
        for acc, fixed in zip(grad_buffers, buffers):
            acc += (fixed.to(torch.float64) / grad_scale).to(acc.dtype)
    if fused_dq:
        return torch.empty_like(q).copy_(dq.mul_(scale)), dk, dv

    # (3) dQ; empty SCORE_GRAD_ARGS: the mod's gradient function returns dS and writes no capture grads
    table_args, flags = block_table_args(tables, "kv")
    descriptors = None
    if tiles.use_tma:
        descriptors = tile_descriptors(((k, pads["E_PAD"]), (v, pads["EV_PAD"])), tiles.BLOCK_N2, target)
    k_src, v_src = descriptors or (k, v)
    _bwd_dq[(triton.cdiv(Q_LEN, tiles.BLOCK_M2), HQ, B)](
        q, k_src, v_src, dout, lse2, delta, dq, q.stride(), k.stride(), v.stride(), dout.stride(), dq.stride(),
        *table_args, HQ, Q_LEN, KV_LEN, rows, scale,
        score_mod.fn, score_mod.args, mask_mod.fn, mask_mod.args, score_mod.grad_fn, (),
        BLOCK_M2=tiles.BLOCK_M2, BLOCK_N2=tiles.BLOCK_N2, CHECK_M=Q_LEN % tiles.BLOCK_M2 != 0,
        CHECK_N=KV_LEN % kv_block != 0, USE_TMA=descriptors is not None, **flags, **meta,
    )  # fmt: skip
    return dq, dk, dv


def _padded_rows(q_len: int, q_block: int, tiles) -> int:
    """ROWS: ``q_len`` rounded up to a multiple of the preprocess block (64), the BlockMask's Q_BLOCK
    and both kernels' query tiles, so that no query tile reads past the padded DELTA / LSE2 rows."""
    multiple = math.lcm(64, q_block, tiles.BLOCK_M1, tiles.BLOCK_M2)
    return triton.cdiv(q_len, multiple) * multiple


def _check_inputs(q, k, v, out, lse, dout, dlse, tables: BlockTables, score_mod, grad_buffers, target):
    """Clear errors for arguments the kernels would misread (the forward's checks, plus the backward's own)."""
    B, HQ, Q_LEN, _ = check_qkv(q, k, v, tables.kv_num_blocks, target)
    KV_LEN, EV = v.shape[2], v.shape[3]
    q_block, kv_block = tables.q_block, tables.kv_block
    check_block_tables(
        tables, "kv", B, HQ, triton.cdiv(Q_LEN, q_block), f"Q_LEN={Q_LEN} with Q_BLOCK={q_block}"
    )
    check_block_tables(
        tables, "q", B, HQ, triton.cdiv(KV_LEN, kv_block), f"KV_LEN={KV_LEN} with KV_BLOCK={kv_block}"
    )
    if tables.has_full != (tables.full_q_num_blocks is not None):
        raise ValueError(
            "full_kv_num_blocks and full_q_num_blocks (the transposed view of the full blocks) must both be "
            f"given or both be None; got {'a tensor' if tables.has_full else 'None'} "
            f"and {'None' if tables.full_q_num_blocks is None else 'a tensor'}."
        )
    for name, t in (("out", out), ("dout", dout)):
        if tuple(t.shape) != (B, HQ, Q_LEN, EV) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} must be ({B}, {HQ}, {Q_LEN}, {EV}) {q.dtype} on {q.device} like the forward's output; "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}."
            )
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (
            tuple(t.shape) != (B, HQ, Q_LEN) or not t.is_floating_point() or t.device != q.device
        ):
            raise ValueError(
                f"{name} must be a floating-point ({B}, {HQ}, {Q_LEN}) tensor on {q.device}; "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}."
            )
    captures = score_mod.grad_captures
    if len(grad_buffers) != len(captures) or any(
        g.shape != c.shape or g.dtype != torch.float32 or not g.is_contiguous()
        for g, c in zip(grad_buffers, captures)
    ):
        raise ValueError(
            f"grad_buffers must be contiguous fp32 tensors shaped like score_mod.grad_captures "
            f"{[tuple(c.shape) for c in captures]}; got {[(tuple(g.shape), g.dtype) for g in grad_buffers]}."
        )


__all__ = ["FIXED_POINT_BITS", "flex_backward"]
