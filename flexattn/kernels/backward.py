"""Backward kernels (FlashAttention-2 style) and their launcher ``flex_backward``.

Glossary (the letters every kernel below uses):
    B, HQ, HKV    batch, query heads, key/value heads; G = HQ // HKV query heads share one kv head
    Q_LEN, KV_LEN sequence lengths of queries and keys
    E, EV         head dims of q/k and of v (EV may differ), E_PAD / EV_PAD: next power of two >= 16
    Q_BLOCK, KV_BLOCK   the BlockMask's block sizes (sparsity granularity)
    BLOCK_M1, BLOCK_N1  dK/dV kernel tiles: BLOCK_N1 keys per program, BLOCK_M1 queries per step
    BLOCK_M2, BLOCK_N2  dQ kernel tiles: BLOCK_M2 queries per program, BLOCK_N2 keys per step
    LSE2          the forward's logsumexp in base 2 (+inf on empty rows, so that p = 0 there)
    DELTA         rowsum(dO * O) - dLSE (fp32)

Math, per (b, hq, i, j) with s = (q . k) * scale and m = score_mod(s) (``-inf`` where masked):
    p = exp(m - lse);  dp = dO . v;  dm = p * (dp - DELTA)
    ds = SCORE_GRAD_FN(s, ..., dm)  (dLoss/ds; also accumulates captured-tensor gradients)
    dV = sum_i p dO;  dK = scale * sum_i ds q;  dQ = scale * sum_j ds k

The user's mods are called at exactly one place per kernel (``_dkdv_step`` and ``_dq_step``).
The dK/dV kernel holds the tiles transposed (keys along rows): it calls the mods with
``q_idx`` shaped ``[1, BLOCK_M1]``, ``kv_idx`` shaped ``[BLOCK_N1, 1]`` and a ``[BLOCK_N1, BLOCK_M1]``
score, which the elementwise mod functions broadcast like the forward's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexattn.kernels import common  # noqa: F401  (makes loaded loop bounds work in the interpreter)
from flexattn.kernels.backward_tiles import choose_backward_tiles

# Deterministic mode accumulates captured-tensor gradients as 64-bit fixed point: each contribution
# is scaled by 2**FIXED_POINT_BITS and truncated to an integer, so the sum is order independent.
# Resolution 2**-32 (about 2.3e-10) per contribution; the final gradient must stay below 2**31.
FIXED_POINT_BITS = 32

# fmt: off  (kernel and launch arguments are grouped by meaning, several per line)


# ----------------------------------------------------------------------------------------------
# Preprocess: DELTA = rowsum(dO * O) - dLSE
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(
    # pointers
    O,
    DO,
    DLSE,
    DELTA,
    # strides (b, h, m, e) of O and dO; DLSE and DELTA are contiguous (B, HQ, Q_LEN)
    stride_ob,
    stride_oh,
    stride_om,
    stride_oe,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_doe,
    # sizes
    HQ,
    Q_LEN,
    EV,
    # meta-parameters
    BLOCK: tl.constexpr,
    EV_PAD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_e = tl.arange(0, EV_PAD)
    mask = (offs_m[:, None] < Q_LEN) & (offs_e[None, :] < EV)
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_e[None, :] * stride_oe,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_e[None, :] * stride_doe,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    row = pid_bh * Q_LEN + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Q_LEN, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Q_LEN)


@triton.jit
def _load_lse2(LSE, row, in_range):
    """The forward's natural-log LSE in base 2; +inf on empty rows and out of range so p = 0."""
    lse = tl.load(LSE + row, mask=in_range, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# dK / dV: one program per (BLOCK_N1 keys, b, kv head); loops over the G query heads of the group
# and, for each, over the query blocks of the transposed BlockMask (partial, then full).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_step(
    dk,
    dv,
    k,
    v,
    start_m,
    offs_n,
    b,
    hq,
    Q,
    DO,
    LSE,
    DELTA,
    q_base,
    do_base,
    row_base,
    stride_qm,
    stride_qe,
    stride_dom,
    stride_doe,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    scale,
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    BLOCK_M1: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    IS_FULL: tl.constexpr,
    GRAD_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # -- load BLOCK_M1 query rows (transposed) and their dO, LSE, DELTA
    offs_m = start_m + tl.arange(0, BLOCK_M1)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    m_in = offs_m < Q_LEN
    qT = tl.load(
        Q + q_base + offs_m[None, :] * stride_qm + offs_e[:, None] * stride_qe,
        mask=m_in[None, :] & (offs_e[:, None] < E),
        other=0.0,
    )
    do = tl.load(
        DO + do_base + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
        mask=m_in[:, None] & (offs_ev[None, :] < EV),
        other=0.0,
    )
    lse2 = _load_lse2(LSE, row_base + offs_m, m_in)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_in, other=0.0)

    # -- recompute the scores and probabilities, keys along rows: [BLOCK_N1, BLOCK_M1]
    sT = tl.dot(k, qT, input_precision=PRECISION) * scale
    q_idx = (offs_m % Q_LEN)[None, :]
    kv_idx = (offs_n % KV_LEN)[:, None]
    mT = SCORE_FN(sT, b, hq, q_idx, kv_idx, SCORE_ARGS)
    valid = m_in[None, :] & (offs_n < KV_LEN)[:, None]
    if not IS_FULL:
        valid = valid & MASK_FN(b, hq, q_idx, kv_idx, MASK_ARGS)
    pT = tl.where(valid, tl.math.exp2(mT * 1.4426950408889634 - lse2[None, :]), 0.0)

    # -- dV += P^T dO;  dP^T = V dO^T;  dM = P * (dP - DELTA)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dmT = pT * (dpT - delta[None, :])

    # -- through the score mod (captured-tensor gradients accumulate here), then dK += dS^T Q
    if GRAD_SCALE != 1.0:
        dsT = SCORE_GRAD_FN(sT, b, hq, q_idx, kv_idx, dmT * GRAD_SCALE, SCORE_ARGS, SCORE_GRAD_ARGS)
        dsT = dsT * (1.0 / GRAD_SCALE)
    else:
        dsT = SCORE_GRAD_FN(sT, b, hq, q_idx, kv_idx, dmT, SCORE_ARGS, SCORE_GRAD_ARGS)
    dsT = tl.where(valid, dsT, 0.0)
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    offs_n,
    b,
    hq,
    num_blocks,
    block_indices,
    Q,
    DO,
    LSE,
    DELTA,
    q_base,
    do_base,
    row_base,
    stride_qm,
    stride_qe,
    stride_dom,
    stride_doe,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    scale,
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    Q_BLOCK: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    IS_FULL: tl.constexpr,
    GRAD_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Visit the BLOCK_M1-row sub-tiles of every listed query block (skipping those past Q_LEN)."""
    SUB: tl.constexpr = Q_BLOCK // BLOCK_M1
    for i in range(0, num_blocks * SUB):
        block = tl.load(block_indices + i // SUB)
        start_m = block * Q_BLOCK + (i % SUB) * BLOCK_M1
        if start_m < Q_LEN:
            dk, dv = _dkdv_step(
                dk,
                dv,
                k,
                v,
                start_m,
                offs_n,
                b,
                hq,
                Q,
                DO,
                LSE,
                DELTA,
                q_base,
                do_base,
                row_base,
                stride_qm,
                stride_qe,
                stride_dom,
                stride_doe,
                Q_LEN,
                KV_LEN,
                E,
                EV,
                scale,
                SCORE_FN,
                SCORE_ARGS,
                MASK_FN,
                MASK_ARGS,
                SCORE_GRAD_FN,
                SCORE_GRAD_ARGS,
                BLOCK_M1,
                E_PAD,
                EV_PAD,
                IS_FULL,
                GRAD_SCALE,
                PRECISION,
            )
    return dk, dv


@triton.jit
def _bwd_dkdv(
    # pointers: inputs, forward results, outputs
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    # transposed BlockMask: (MASK_B, MASK_H, NKV) counts and (MASK_B, MASK_H, NKV, NQ) indices
    Q_NUM,
    Q_IDX,
    FULL_Q_NUM,
    FULL_Q_IDX,
    # strides (b, h, l, e); LSE and DELTA are contiguous (B, HQ, Q_LEN); DK, DV like K, V
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qe,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_ke,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_doe,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dke,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dve,
    # sizes
    HQ,
    HKV,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    MASK_B,
    MASK_H,
    NQ,
    NKV,
    scale,
    # the compiled mods
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    # meta-parameters
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    G: tl.constexpr,
    HAS_FULL: tl.constexpr,
    GRAD_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N1
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    n_in = offs_n < KV_LEN

    # -- this program's keys and values stay in registers for the whole loop
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_e[None, :] * stride_ke,
        mask=n_in[:, None] & (offs_e[None, :] < E),
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_ev[None, :] * stride_ve,
        mask=n_in[:, None] & (offs_ev[None, :] < EV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N1, E_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, EV_PAD], dtype=tl.float32)

    # -- sum over the query heads of the group: no atomics on dK / dV
    kv_block = start_n // KV_BLOCK
    mb = b % MASK_B
    for g in range(G):
        hq = hk * G + g
        mh = hq % MASK_H
        q_base = b * stride_qb + hq * stride_qh
        do_base = b * stride_dob + hq * stride_doh
        row_base = (b * HQ + hq) * Q_LEN
        num_off = (mb * MASK_H + mh) * NKV + kv_block
        idx_off = num_off * NQ
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            offs_n,
            b,
            hq,
            tl.load(Q_NUM + num_off),
            Q_IDX + idx_off,
            Q,
            DO,
            LSE,
            DELTA,
            q_base,
            do_base,
            row_base,
            stride_qm,
            stride_qe,
            stride_dom,
            stride_doe,
            Q_LEN,
            KV_LEN,
            E,
            EV,
            scale,
            SCORE_FN,
            SCORE_ARGS,
            MASK_FN,
            MASK_ARGS,
            SCORE_GRAD_FN,
            SCORE_GRAD_ARGS,
            Q_BLOCK,
            BLOCK_M1,
            E_PAD,
            EV_PAD,
            False,
            GRAD_SCALE,
            PRECISION,
        )
        if HAS_FULL:
            dk, dv = _dkdv_blocks(
                dk,
                dv,
                k,
                v,
                offs_n,
                b,
                hq,
                tl.load(FULL_Q_NUM + num_off),
                FULL_Q_IDX + idx_off,
                Q,
                DO,
                LSE,
                DELTA,
                q_base,
                do_base,
                row_base,
                stride_qm,
                stride_qe,
                stride_dom,
                stride_doe,
                Q_LEN,
                KV_LEN,
                E,
                EV,
                scale,
                SCORE_FN,
                SCORE_ARGS,
                MASK_FN,
                MASK_ARGS,
                SCORE_GRAD_FN,
                SCORE_GRAD_ARGS,
                Q_BLOCK,
                BLOCK_M1,
                E_PAD,
                EV_PAD,
                True,
                GRAD_SCALE,
                PRECISION,
            )

    # -- write dK (scaled) and dV
    dk *= scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
        dk.to(DK.dtype.element_ty),
        mask=n_in[:, None] & (offs_e[None, :] < E),
    )
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_ev[None, :] * stride_dve,
        dv.to(DV.dtype.element_ty),
        mask=n_in[:, None] & (offs_ev[None, :] < EV),
    )


# ----------------------------------------------------------------------------------------------
# dQ: one program per (BLOCK_M2 queries, b, query head); loops over the kv blocks of the BlockMask
# (partial, then full), recomputing P and dP.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(
    dq,
    q,
    do,
    lse2,
    delta,
    offs_m,
    start_n,
    b,
    hq,
    K,
    V,
    k_base,
    v_base,
    stride_kn,
    stride_ke,
    stride_vn,
    stride_ve,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    scale,
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    BLOCK_N2: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    IS_FULL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # -- load BLOCK_N2 keys and values, transposed
    offs_n = start_n + tl.arange(0, BLOCK_N2)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    n_in = offs_n < KV_LEN
    kT = tl.load(
        K + k_base + offs_n[None, :] * stride_kn + offs_e[:, None] * stride_ke,
        mask=n_in[None, :] & (offs_e[:, None] < E),
        other=0.0,
    )
    vT = tl.load(
        V + v_base + offs_n[None, :] * stride_vn + offs_ev[:, None] * stride_ve,
        mask=n_in[None, :] & (offs_ev[:, None] < EV),
        other=0.0,
    )

    # -- recompute scores and probabilities: [BLOCK_M2, BLOCK_N2]
    s = tl.dot(q, kT, input_precision=PRECISION) * scale
    q_idx = (offs_m % Q_LEN)[:, None]
    kv_idx = (offs_n % KV_LEN)[None, :]
    m = SCORE_FN(s, b, hq, q_idx, kv_idx, SCORE_ARGS)
    valid = (offs_m < Q_LEN)[:, None] & n_in[None, :]
    if not IS_FULL:
        valid = valid & MASK_FN(b, hq, q_idx, kv_idx, MASK_ARGS)
    p = tl.where(valid, tl.math.exp2(m * 1.4426950408889634 - lse2[:, None]), 0.0)

    # -- dP = dO V^T;  dM = P * (dP - DELTA);  through the score mod;  dQ += dS K
    dp = tl.dot(do, vT, input_precision=PRECISION)
    dm = p * (dp - delta[:, None])
    ds = SCORE_GRAD_FN(s, b, hq, q_idx, kv_idx, dm, SCORE_ARGS, SCORE_GRAD_ARGS)
    ds = tl.where(valid, ds, 0.0)
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse2,
    delta,
    offs_m,
    b,
    hq,
    num_blocks,
    block_indices,
    K,
    V,
    k_base,
    v_base,
    stride_kn,
    stride_ke,
    stride_vn,
    stride_ve,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    scale,
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    KV_BLOCK: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    IS_FULL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Visit the BLOCK_N2-key sub-tiles of every listed kv block (skipping those past KV_LEN)."""
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N2
    for i in range(0, num_blocks * SUB):
        block = tl.load(block_indices + i // SUB)
        start_n = block * KV_BLOCK + (i % SUB) * BLOCK_N2
        if start_n < KV_LEN:
            dq = _dq_step(
                dq,
                q,
                do,
                lse2,
                delta,
                offs_m,
                start_n,
                b,
                hq,
                K,
                V,
                k_base,
                v_base,
                stride_kn,
                stride_ke,
                stride_vn,
                stride_ve,
                Q_LEN,
                KV_LEN,
                E,
                EV,
                scale,
                SCORE_FN,
                SCORE_ARGS,
                MASK_FN,
                MASK_ARGS,
                SCORE_GRAD_FN,
                SCORE_GRAD_ARGS,
                BLOCK_N2,
                E_PAD,
                EV_PAD,
                IS_FULL,
                PRECISION,
            )
    return dq


@triton.jit
def _bwd_dq(
    # pointers: inputs, forward results, output
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    # BlockMask: (MASK_B, MASK_H, NQ) counts and (MASK_B, MASK_H, NQ, NKV) indices
    KV_NUM,
    KV_IDX,
    FULL_KV_NUM,
    FULL_KV_IDX,
    # strides (b, h, l, e); LSE and DELTA are contiguous (B, HQ, Q_LEN); DQ like Q
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qe,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_ke,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_doe,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqe,
    # sizes
    HQ,
    Q_LEN,
    KV_LEN,
    E,
    EV,
    MASK_B,
    MASK_H,
    NQ,
    NKV,
    scale,
    # the compiled mods (SCORE_GRAD_ARGS here point at scratch buffers: the dK/dV kernel owns them)
    SCORE_FN: tl.constexpr,
    SCORE_ARGS,
    MASK_FN: tl.constexpr,
    MASK_ARGS,
    SCORE_GRAD_FN: tl.constexpr,
    SCORE_GRAD_ARGS,
    # meta-parameters
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    E_PAD: tl.constexpr,
    EV_PAD: tl.constexpr,
    G: tl.constexpr,
    HAS_FULL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    hk = hq // G
    start_m = pid_m * BLOCK_M2
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    m_in = offs_m < Q_LEN

    # -- this program's queries, dO, LSE and DELTA stay in registers
    q = tl.load(
        Q + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qm + offs_e[None, :] * stride_qe,
        mask=m_in[:, None] & (offs_e[None, :] < E),
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + hq * stride_doh + offs_m[:, None] * stride_dom + offs_ev[None, :] * stride_doe,
        mask=m_in[:, None] & (offs_ev[None, :] < EV),
        other=0.0,
    )
    row = (b * HQ + hq) * Q_LEN + offs_m
    lse2 = _load_lse2(LSE, row, m_in)
    delta = tl.load(DELTA + row, mask=m_in, other=0.0)
    dq = tl.zeros([BLOCK_M2, E_PAD], dtype=tl.float32)

    # -- partial kv blocks, then full ones
    k_base = b * stride_kb + hk * stride_kh
    v_base = b * stride_vb + hk * stride_vh
    num_off = ((b % MASK_B) * MASK_H + hq % MASK_H) * NQ + start_m // Q_BLOCK
    idx_off = num_off * NKV
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse2,
        delta,
        offs_m,
        b,
        hq,
        tl.load(KV_NUM + num_off),
        KV_IDX + idx_off,
        K,
        V,
        k_base,
        v_base,
        stride_kn,
        stride_ke,
        stride_vn,
        stride_ve,
        Q_LEN,
        KV_LEN,
        E,
        EV,
        scale,
        SCORE_FN,
        SCORE_ARGS,
        MASK_FN,
        MASK_ARGS,
        SCORE_GRAD_FN,
        SCORE_GRAD_ARGS,
        KV_BLOCK,
        BLOCK_N2,
        E_PAD,
        EV_PAD,
        False,
        PRECISION,
    )
    if HAS_FULL:
        dq = _dq_blocks(
            dq,
            q,
            do,
            lse2,
            delta,
            offs_m,
            b,
            hq,
            tl.load(FULL_KV_NUM + num_off),
            FULL_KV_IDX + idx_off,
            K,
            V,
            k_base,
            v_base,
            stride_kn,
            stride_ke,
            stride_vn,
            stride_ve,
            Q_LEN,
            KV_LEN,
            E,
            EV,
            scale,
            SCORE_FN,
            SCORE_ARGS,
            MASK_FN,
            MASK_ARGS,
            SCORE_GRAD_FN,
            SCORE_GRAD_ARGS,
            KV_BLOCK,
            BLOCK_N2,
            E_PAD,
            EV_PAD,
            True,
            PRECISION,
        )

    dq *= scale
    tl.store(
        DQ + b * stride_dqb + hq * stride_dqh + offs_m[:, None] * stride_dqm + offs_e[None, :] * stride_dqe,
        dq.to(DQ.dtype.element_ty),
        mask=m_in[:, None] & (offs_e[None, :] < E),
    )


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def flex_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    dlse,
    *,
    score_mod,
    mask_mod,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks,
    full_kv_indices,
    q_num_blocks,
    q_indices,
    full_q_num_blocks,
    full_q_indices,
    q_block,
    kv_block,
    scale,
    options,
    grad_buffers=(),
):
    """Gradients of flex attention with respect to q, k, v and the score mod's captured tensors.

    Shapes: ``q (B, HQ, Q_LEN, E)``, ``k (B, HKV, KV_LEN, E)``, ``v (B, HKV, KV_LEN, EV)``,
    ``out``/``dout`` like ``(B, HQ, Q_LEN, EV)``, ``lse`` (natural log, fp32) and ``dlse`` (or None)
    ``(B, HQ, Q_LEN)``. ``score_mod``/``mask_mod`` are ``KernelMod``s; the BlockMask tensors are
    int32, ``(MASK_B, MASK_H, ...)`` with MASK_B in {1, B} and MASK_H in {1, HQ}. ``grad_buffers``:
    fp32 zeros shaped like ``score_mod.grad_captures``; the captured-tensor gradients are *added* to
    them. Returns ``(dq, dk, dv)`` in the inputs' dtype.

    Parallelization: three launches. (1) ``DELTA = rowsum(dO * O) - dLSE``, one program per
    (rows, b, h). (2) dK/dV: one program per (BLOCK_N1 keys, b, kv head) that loops over the G
    query heads of its group and the query blocks of the transposed BlockMask, so dK/dV need no
    atomics; it owns the captured-tensor gradients (atomics in the mod's gradient function, or
    64-bit fixed-point atomics with ``options.deterministic``: order independent, bitwise
    reproducible). (3) dQ: one program per (BLOCK_M2 queries, b, query head) over the kv blocks.

    Example::

        dq, dk, dv = flex_backward(q, k, v, out, lse, dout, None, score_mod=..., mask_mod=...,
                                   kv_num_blocks=mask.kv_num_blocks, ..., q_block=128, kv_block=128,
                                   scale=q.shape[-1] ** -0.5, options=KernelOptions())
    """
    B, HQ, Q_LEN, E = q.shape
    _, HKV, KV_LEN, EV = v.shape
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({HKV}).")
    G = HQ // HKV
    tiles = choose_backward_tiles(E, EV, q.dtype, q_block, kv_block, q.is_cuda, options)
    e_pad = max(16, triton.next_power_of_2(E))
    ev_pad = max(16, triton.next_power_of_2(EV))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}

    # (1) DELTA
    delta = torch.empty((B, HQ, Q_LEN), device=q.device, dtype=torch.float32)
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_block = 64
    _bwd_preprocess[(triton.cdiv(Q_LEN, pre_block), B * HQ)](
        out,
        dout,
        dlse if dlse is not None else delta,
        delta,
        *out.stride(),
        *dout.stride(),
        HQ,
        Q_LEN,
        EV,
        BLOCK=pre_block,
        EV_PAD=ev_pad,
        HAS_DLSE=dlse is not None,
    )

    # BlockMask tables, contiguous (broadcast dims read through `b % MASK_B`, `h % MASK_H`)
    mask_b, mask_h, nq, nkv = kv_indices.shape
    has_full = full_kv_num_blocks is not None
    kv_num, kv_idx = kv_num_blocks.contiguous(), kv_indices.contiguous()
    q_num, q_idx = q_num_blocks.contiguous(), q_indices.contiguous()
    full_kv_num = full_kv_num_blocks.contiguous() if has_full else kv_num
    full_kv_idx = full_kv_indices.contiguous() if has_full else kv_idx
    full_q_num = full_q_num_blocks.contiguous() if has_full else q_num
    full_q_idx = full_q_indices.contiguous() if has_full else q_idx
    sizes = (mask_b, mask_h, nq, nkv, scale)

    # (2) dK, dV (+ captured-tensor gradients)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    grad_scale = 1.0
    buffers = tuple(grad_buffers)
    if options.deterministic and buffers:
        grad_scale = float(2**FIXED_POINT_BITS)
        buffers = tuple(torch.zeros(g.shape, device=g.device, dtype=torch.int64) for g in grad_buffers)
    _bwd_dkdv[(triton.cdiv(KV_LEN, tiles.BLOCK_N1), B * HKV)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        q_num,
        q_idx,
        full_q_num,
        full_q_idx,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dk.stride(),
        *dv.stride(),
        HQ,
        HKV,
        Q_LEN,
        KV_LEN,
        E,
        EV,
        *sizes,
        score_mod.fn,
        score_mod.args,
        mask_mod.fn,
        mask_mod.args,
        score_mod.grad_fn,
        score_mod.grad_args(buffers),
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        BLOCK_M1=tiles.BLOCK_M1,
        BLOCK_N1=tiles.BLOCK_N1,
        E_PAD=e_pad,
        EV_PAD=ev_pad,
        G=G,
        HAS_FULL=has_full,
        GRAD_SCALE=grad_scale,
        PRECISION=precision,
        **launch,
    )
    if grad_scale != 1.0:
        for acc, fixed in zip(grad_buffers, buffers):
            acc += (fixed.to(torch.float64) * (1.0 / grad_scale)).to(acc.dtype)

    # (3) dQ; the mod's gradient function writes captured-tensor gradients into discarded scratch
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    scratch = tuple(torch.empty_like(g, dtype=torch.float32) for g in grad_buffers)
    _bwd_dq[(triton.cdiv(Q_LEN, tiles.BLOCK_M2), B * HQ)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        kv_num,
        kv_idx,
        full_kv_num,
        full_kv_idx,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        *dq.stride(),
        HQ,
        Q_LEN,
        KV_LEN,
        E,
        EV,
        *sizes,
        score_mod.fn,
        score_mod.args,
        mask_mod.fn,
        mask_mod.args,
        score_mod.grad_fn,
        score_mod.grad_args(scratch),
        Q_BLOCK=q_block,
        KV_BLOCK=kv_block,
        BLOCK_M2=tiles.BLOCK_M2,
        BLOCK_N2=tiles.BLOCK_N2,
        E_PAD=e_pad,
        EV_PAD=ev_pad,
        G=G,
        HAS_FULL=has_full,
        PRECISION=precision,
        **launch,
    )
    return dq, dk, dv


__all__ = ["FIXED_POINT_BITS", "flex_backward"]
