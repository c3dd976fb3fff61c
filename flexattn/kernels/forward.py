"""The fused forward kernel: block-sparse FlashAttention-2 with the compiled mods inlined.

Glossary:
    B, HQ, HKV        batch, query heads, key/value heads (query head h reads kv head h // GQA_GROUP)
    Q_LEN, KV_LEN     sequence lengths (runtime values: new lengths do not recompile)
    E, EV             head dims of q/k and of v; E_PAD, EV_PAD their power-of-two tile widths
    BLOCK_M, BLOCK_N  the kernel's tile: BLOCK_M queries x BLOCK_N keys
    Q_BLOCK, KV_BLOCK the BlockMask's block sizes; BLOCK_M divides Q_BLOCK, BLOCK_N divides KV_BLOCK
    partial / full    kv blocks where mask_mod must be evaluated / where every pair is allowed

Scores are kept in natural units for the mods and for max_scores; the softmax uses exp2 with
log2(e) folded into one fused multiply-add per score. With an identity score mod (SCORE_IS_IDENTITY) the
kernel keeps raw q.k and folds the scale into that multiply-add too, converting the row maxima to
natural units once at the end. An additive score mod (SCORE_IS_ADDITIVE, ``score + f(b, h, q, kv)``)
keeps base-2 scores ``qk * (scale * log2e) + BIAS_FN(...)`` (compiler/additive.py) and converts likewise.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.checks import block_table_args, check_block_tables, check_call_kv
from flexattn.kernels.device import (
    DeviceLimits,
    device_limits,
    dot_precision,
    tile_descriptors,
    tma_compatible,
)
from flexattn.kernels.launch import LaunchCache, alignment, args_key, broadcast_strides
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.tile_io import (
    clamp_tail,
    listed_tiles,
    load_kv,
    load_rows,
    mask_row,
    mask_tail,
    paged_rows,
    sparse_tile_start,
    tile_source,
)
from flexattn.kernels.tiles import (
    TileCache,
    Tiles,
    autotune_candidates,
    forward_tiles,
    padded_head_dim,
    smaller_tiles,
)
from flexattn.options import DEFAULT_OPTIONS

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


# fmt: off
@triton.jit
def _qk_tile(q, k_src, kv_rows, b, hk, start_n, k_strides, KV_LEN, E: tl.constexpr, E_PAD: tl.constexpr,
             BLOCK_N: tl.constexpr, CHECK_N: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
             PAGE: tl.constexpr):
    """Raw q . k^T (fp32, BLOCK_M x BLOCK_N) for the keys starting at start_n (paged: at kv_rows)."""
    k = load_kv(k_src, kv_rows, b, hk, start_n, k_strides, KV_LEN, E, E_PAD, BLOCK_N, CHECK_N, USE_TMA, PAGE)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(
    acc, l_i, m_i,                                   # running output (BLOCK_M, EV_PAD), row sum, row max
    qk, v_src, kv_rows, start_n, q_idx, b, h, hk,    # this tile: raw q.k^T, V source, paged rows, first key
    v_strides, KV_LEN, scale,
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    IS_FULL: tl.constexpr, CHECK_N: tl.constexpr, ROWS_SAFE: tl.constexpr, USE_TMA: tl.constexpr,
    EV: tl.constexpr, EV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr, BIAS_FN: tl.constexpr,
    PAGE: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile: mods, mask, online-softmax update of (acc, l_i, m_i).

    SCORE_IS_IDENTITY (identity score mod, positive scale): scores and m_i stay in raw q.k units and the
    scale folds into the base-2 multiplier, one multiply per score fewer. SCORE_IS_ADDITIVE (``score +
    f(...)``): scores and m_i are in base 2, ``qk * (scale * log2e) + BIAS_FN(...)``, one FMA per score.
    """
    # -- scores: s = (q . k) * scale, then score_mod (natural units, fp32) --
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
    kv_idx = clamp_tail(kv_pos, KV_LEN, CHECK_N)[None, :]  # tail keys read in bounds; mask_tail drops them
    if SCORE_IS_ADDITIVE:
        scores = scores + BIAS_FN(b, h, q_idx, kv_idx, SCORE_ARGS)
    elif not SCORE_IS_IDENTITY:
        scores = SCORE_FN(scores, b, h, q_idx, kv_idx, SCORE_ARGS)
    if not IS_FULL:
        scores = tl.where(MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS), scores, float("-inf"))
    scores = mask_tail(scores, kv_pos[None, :], KV_LEN, CHECK_N)

    # -- online softmax in base 2: p = exp2(s * log2e - m * log2e), one FMA per score --
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    if ROWS_SAFE:
        m_ref = m_new
    else:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows masked so far: p = 0, no NaN
    m_ref2 = m_ref * to_base2
    p = tl.math.exp2(scores * to_base2 - m_ref2[:, None])
    alpha = tl.math.exp2(m_i * to_base2 - m_ref2)
    l_i = l_i * alpha + tl.sum(p, 1)

    # -- accumulate p @ v --
    v = load_kv(v_src, kv_rows, b, hk, start_n, v_strides, KV_LEN, EV, EV_PAD, BLOCK_N, CHECK_N, USE_TMA, PAGE)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Lengths and block counts change with the sequence length: not specialized, so new lengths reuse the
# compiled kernel. (q/k/v strides stay specialized: their divisibility enables wide loads.)
@triton.jit(do_not_specialize=["Q_LEN", "KV_LEN", "MASK_H", "MASK_NQ", "MASK_NKV", "page_table_stride"])
def _flex_forward_kernel(
    # tensors: q (B, HQ, Q_LEN, E), k (B, HKV, KV_LEN, E), v (B, HKV, KV_LEN, EV); out like q with EV.
    # K and V are tensor descriptors when USE_TMA, else pointers. Strides: (batch, head, position, feature)
    Q, K, V, OUT, LSE, MAX_SCORES,
    q_strides, k_strides, v_strides, o_strides,
    # block mask (contiguous): counts (MB, MASK_H, MASK_NQ), indices (MB, MASK_H, MASK_NQ, MASK_NKV);
    # MB is B or 1 (MASK_PER_BATCH 1 or 0), MASK_H is HQ or 1 (MASK_PER_HEAD 1 or 0)
    KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, MASK_H, MASK_NQ, MASK_NKV,
    # paged K/V (PAGE > 0): k/v are caches (1, HKV, N_PAGES * PAGE, E); PAGE_TABLE int32 (B, MAX_PAGES)
    PAGE_TABLE, page_table_stride,
    # sizes and scale
    Q_LEN, KV_LEN, HQ, scale,
    # compiled mods
    SCORE_FN: tl.constexpr, SCORE_ARGS, MASK_FN: tl.constexpr, MASK_ARGS,
    # meta-parameters
    GQA_GROUP: tl.constexpr, E: tl.constexpr, EV: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    MASK_PER_BATCH: tl.constexpr, MASK_PER_HEAD: tl.constexpr,
    HAS_FULL: tl.constexpr, CHECK_N: tl.constexpr, ROWS_SAFE: tl.constexpr, USE_TMA: tl.constexpr,
    PIPELINE_QK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORE_IS_IDENTITY: tl.constexpr, SCORE_IS_ADDITIVE: tl.constexpr, BIAS_FN: tl.constexpr,
    PAGE: tl.constexpr,
):
    # -- which tile: program (m, h, b) owns queries [start_m, start_m + BLOCK_M) of head h --
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GQA_GROUP
    b64 = b.to(tl.int64)
    k_src = tile_source(K, b, hk, k_strides, USE_TMA)  # USE_TMA: descriptors over the whole tensors
    v_src = tile_source(V, b, hk, v_strides, USE_TMA)
    pages = PAGE_TABLE + b64 * page_table_stride  # (unused when PAGE == 0)
    kn_strides = (k_strides[2], k_strides[3])
    vn_strides = (v_strides[2], v_strides[3])

    offs_m = tl.arange(0, BLOCK_M)
    q = load_rows(tile_source(Q, b, h, q_strides, False), b, h, start_m, (q_strides[2], q_strides[3]), Q_LEN, E, E_PAD,
                  BLOCK_M, True, False)
    q_idx = clamp_tail(start_m + offs_m, Q_LEN)[:, None]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], dtype=tl.float32)

    # -- partial kv blocks (mask_mod evaluated element-wise), then full kv blocks (mask_mod skipped) --
    list_row = mask_row(b, h, start_m // Q_BLOCK, MASK_H, MASK_NQ, MASK_PER_BATCH, MASK_PER_HEAD)
    for full in tl.static_range(2 if HAS_FULL else 1):
        idx_row, num_tiles = listed_tiles(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX, list_row, MASK_NKV, full,
                                          KV_BLOCK, BLOCK_N)
        if PIPELINE_QK:  # q.k^T of the next tile is issued before this tile's softmax (overlap)
            start_n = sparse_tile_start(idx_row, 0, 1, KV_BLOCK, BLOCK_N)
            start_n = tl.where(num_tiles > 0, start_n, 0)  # an empty list may hold any index: read tile 0
            kv_rows = paged_rows(pages, start_n, KV_LEN, BLOCK_N, CHECK_N, PAGE)
            qk = _qk_tile(q, k_src, kv_rows, b, hk, start_n, kn_strides, KV_LEN, E, E_PAD, BLOCK_N, CHECK_N, USE_TMA,
                          DOT_PRECISION, PAGE)
        for tile in tl.range(0, num_tiles, warp_specialize=WARP_SPECIALIZE):
            if PIPELINE_QK:
                start_next = sparse_tile_start(idx_row, tl.minimum(tile + 1, num_tiles - 1), 1,
                                               KV_BLOCK, BLOCK_N)
                rows_next = paged_rows(pages, start_next, KV_LEN, BLOCK_N, CHECK_N, PAGE)
                qk_next = _qk_tile(q, k_src, rows_next, b, hk, start_next, kn_strides, KV_LEN, E, E_PAD, BLOCK_N,
                                   CHECK_N, USE_TMA, DOT_PRECISION, PAGE)
            else:
                start_n = sparse_tile_start(idx_row, tile, 1, KV_BLOCK, BLOCK_N)
                kv_rows = paged_rows(pages, start_n, KV_LEN, BLOCK_N, CHECK_N, PAGE)
                qk = _qk_tile(q, k_src, kv_rows, b, hk, start_n, kn_strides, KV_LEN, E, E_PAD, BLOCK_N, CHECK_N, USE_TMA,
                              DOT_PRECISION, PAGE)
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, qk, v_src, kv_rows, start_n, q_idx, b, h, hk, vn_strides, KV_LEN, scale,
                SCORE_FN, SCORE_ARGS, MASK_FN, MASK_ARGS, full == 1, CHECK_N, ROWS_SAFE, USE_TMA,
                EV, EV_PAD, BLOCK_N, DOT_PRECISION, SCORE_IS_IDENTITY, SCORE_IS_ADDITIVE, BIAS_FN, PAGE,
            )
            if PIPELINE_QK:
                qk, start_n, kv_rows = qk_next, start_next, rows_next

    # -- epilogue: normalise; fully masked rows give out = 0, lse = max = -inf --
    if SCORE_IS_IDENTITY:
        m_i = m_i * scale  # back to natural units
    elif SCORE_IS_ADDITIVE:
        m_i = m_i * (1.0 / LOG2E)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    rows = start_m + offs_m
    o_base = OUT + b64 * o_strides[0] + h.to(tl.int64) * o_strides[1] + start_m.to(tl.int64) * o_strides[2]
    offs_ev = tl.arange(0, EV_PAD)
    o_ptrs = o_base + offs_m[:, None] * o_strides[2] + offs_ev[None, :] * o_strides[3]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=(rows[:, None] < Q_LEN) & (offs_ev[None, :] < EV))
    stat_offset = (b64 * HQ + h) * Q_LEN + rows
    tl.store(LSE + stat_offset, lse, mask=rows < Q_LEN)
    tl.store(MAX_SCORES + stat_offset, m_i, mask=rows < Q_LEN)


# fmt: on
def flex_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score_mod,
    mask_mod,
    tables: BlockTables,
    scale: float,
    options=None,
    tiles: Tiles | None = None,
    target: DeviceLimits | None = None,
    paged: PagedKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused block-sparse attention forward.

    Args:
        q: (B, Hq, Lq, E); k: (B, Hkv, Lkv, E); v: (B, Hkv, Lkv, Ev). fp16, bf16 or fp32, any
            strides (no copies are made). ``Hq % Hkv == 0``; query head h reads kv head h // (Hq // Hkv).
        score_mod, mask_mod: ``KernelMod``s from ``flexattn.compiler`` (identity / always-true for None).
        tables: the block lists (``BlockTables``; the kv side is read): partial kv blocks per q
            block, and full ones (mask_mod skipped) or None; (MB, MH, ...) with MB in {1, B},
            MH in {1, Hq} (size-1 dims broadcast).
        scale: multiplies q.k before score_mod.
        options: a ``KernelOptions`` or None. Read here: BLOCK_M, BLOCK_N (must divide q_block /
            kv_block), num_warps, num_stages, USE_TMA (force tensor-descriptor K/V loads; an error
            when k/v cannot take them), ROWS_GUARANTEED_SAFE, autotune (time a few configurations on
            first use of a shape class; the choice is cached in ``$FLEXATTN_CACHE_DIR/forward.json``).
            Unset knobs come from ``tiles.forward_tiles`` (on Hopper: 128-query tiles, TMA K/V loads
            where the strides allow; per head dim and mask the measured fastest tiles and warps).
        tiles: an explicit launch configuration (tools and tests); it replaces the choice above and,
            like user-set options, is never shrunk to fit.
        target: the GPU to plan for (default: the tensors' device); a GPU target with CPU tensors
            only compiles (``benchmarks/compile_report.py``).
        paged: K/V in a paged cache (``PagedKV``), or None (contiguous). Then k and v are the caches
            (1, Hkv, n_pages * page_size, E / Ev), read through ``paged.page_table`` (no gather copy);
            the call's key length is ``paged.kv_len`` (logical positions: the mods and the tables see
            them). The block tables must keep the softmax off rows of unreserved pages
            (``flexattn.paged.PagedAttention.convert_logical_block_mask`` builds such tables).

    Returns:
        out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) fp32 natural log, max_scores (B, Hq, Lq) fp32.

    Parallelization: one program per (BLOCK_M query tile, query head, batch) — grid
    ``(cdiv(Lq, BLOCK_M), Hq, B)``. Each program streams the K/V tiles of the sparse blocks its
    q block lists (partial first, with mask_mod; then full, without), keeping the FlashAttention-2
    running max / sum / accumulator in registers, and writes its rows of out, lse and max_scores once.
    GQA: the G query heads of a group run in nearby programs and read the same K/V tiles, which
    then come from L2; packing a group into one program only pays for short queries (decoding).

    Example (CPU through the interpreter, ``TRITON_INTERPRET=1``)::

        out, lse, mx = flex_forward(q, k, v, score_mod=compile_score_mod(None),
                                    mask_mod=compile_mask_mod(None), tables=mask.tables(), scale=0.125)
    """
    target = device_limits(q.device) if target is None else target
    options = DEFAULT_OPTIONS if options is None else options
    q_block, kv_block = tables.q_block, tables.kv_block
    B, Hq, Lq, E, Lkv = check_call_kv(q, k, v, tables.kv_num_blocks, target, paged)
    if paged is None:
        page_args, page = (tables.kv_num_blocks, 0), 0
    else:
        page_args, page = (paged.page_table, paged.page_table.stride(0)), paged.page_size
    check_block_tables(tables, "kv", B, Hq, triton.cdiv(Lq, q_block), f"Lq={Lq} with Q_BLOCK={q_block}")
    Hkv, Ev = k.shape[1], v.shape[3]
    out = torch.empty((B, Hq, Lq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    max_scores = torch.empty_like(lse)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse, max_scores
    if Lkv == 0 or out.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf")), max_scores.fill_(float("-inf"))

    e_pad, ev_pad = padded_head_dim(E), padded_head_dim(Ev)
    table_args, broadcast_flags = block_table_args(tables, "kv")
    tma_ok = tma_compatible(k, target) and tma_compatible(v, target)
    if options.USE_TMA and not tma_ok:
        raise ValueError(
            "kernel_options['USE_TMA'] needs CUDA k/v with unit feature stride and 16-byte aligned "
            f"base and strides; got k strides {k.stride()}, v strides {v.stride()} ({k.dtype}). "
            "Drop USE_TMA or pass such tensors."
        )

    def launch(tiles: Tiles) -> None:
        use_tma = tiles.use_tma and page % tiles.BLOCK_N == 0  # paged: TMA where a tile sits in one page
        if page and options.USE_TMA and not use_tma:
            raise ValueError(
                f"kernel_options['USE_TMA'] with a paged cache needs page_size ({page}) to be a multiple of "
                f"BLOCK_N ({tiles.BLOCK_N}); drop USE_TMA or pick a smaller BLOCK_N."
            )
        descriptors = (
            tile_descriptors(((k, e_pad), (v, ev_pad)), tiles.BLOCK_N, target, compatible=tma_ok)
            if use_tma
            else None
        )
        k_src, v_src = descriptors or (k, v)
        grid = (-(-Lq // tiles.BLOCK_M), Hq, B)
        strides = (broadcast_strides(q), broadcast_strides(k), broadcast_strides(v), broadcast_strides(out))
        args = (
            q, k_src, v_src, out, lse, max_scores, *strides, *table_args, *page_args, Lq, Lkv, Hq, float(scale),
            score_mod.fn, score_mod.args, mask_mod.fn, mask_mod.args,
        )  # fmt: skip
        rows_safe = options.ROWS_GUARANTEED_SAFE
        identity = score_mod.trivial and float(scale) > 0
        precision = dot_precision(q.dtype)

        def keywords() -> dict:  # the constexprs and launch options by name (for Triton's binding)
            return dict(
                GQA_GROUP=Hq // Hkv, E=E, EV=Ev, E_PAD=e_pad, EV_PAD=ev_pad,
                BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, Q_BLOCK=q_block, KV_BLOCK=kv_block,
                **broadcast_flags, HAS_FULL=tables.has_full, CHECK_N=Lkv % kv_block != 0,
                ROWS_SAFE=rows_safe, USE_TMA=descriptors is not None,
                PIPELINE_QK=tiles.pipeline_qk, WARP_SPECIALIZE=tiles.warp_specialize,
                DOT_PRECISION=precision, SCORE_IS_IDENTITY=identity,
                SCORE_IS_ADDITIVE=score_mod.bias_fn is not None, BIAS_FN=score_mod.bias_fn, PAGE=page,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                **({"maxnreg": tiles.max_registers} if tiles.max_registers else {}),
            )  # fmt: skip

        # What Triton specialises on, or more: the values keywords() is made of (tiles holds the
        # launch options), dtypes and 16-byte alignment of the pointers, the specialised ints by
        # value, the unspecialised ones (lengths, mask sizes, the page table's row stride) by width.
        pointers = (q, out, lse, max_scores, *table_args[:4], page_args[0]) + (() if descriptors else (k, v))
        key = (
            tiles, Hq // Hkv, E, Ev, q_block, kv_block, tuple(broadcast_flags.values()), tables.has_full,
            Lkv % kv_block != 0, rows_safe, descriptors is not None, precision, identity, page,
            q.dtype, strides, Hq, id(score_mod.fn), id(score_mod.bias_fn), id(mask_mod.fn), alignment(*pointers),
            (k.shape, k.stride(), v.shape, v.stride()) if descriptors else None,
            max(Lq, Lkv, page_args[1], *table_args[4:]) < 2**31, args_key(score_mod.args), args_key(mask_mod.args),
        )  # fmt: skip
        _LAUNCHES.launch(grid, key, args, keywords, pinned=(score_mod.fn, score_mod.bias_fn, mask_mod.fn))

    user_set = tiles is not None or any(getattr(options, n) for n in ("BLOCK_M", "BLOCK_N", "num_stages"))
    if tiles is None:
        tiles = choose_tiles(
            q,
            E,
            Ev,
            Lq,
            Lkv,
            q_block,
            kv_block,
            options,
            launch,
            target,
            not mask_mod.trivial,
            score_mod.tile_gathers or mask_mod.tile_gathers,
            page,
        )
    fit_key = (score_mod.fn, mask_mod.fn, q.dtype, E, Ev, q_block, kv_block, Hq // Hkv, q.device, page)
    launch_within_resources(launch, tiles, fit_key, user_set)
    return out, lse, max_scores


# The compiled forward kernels by launch key: repeat calls skip Triton's argument binding (launch.py).
_LAUNCHES = LaunchCache(_flex_forward_kernel)


# Launch configurations shrunk after the compiler reported too little shared memory, by
# (launch key, first choice): later calls start from the fitted tiles and compile nothing twice.
_FITTED_TILES: dict[tuple, Tiles] = {}


def launch_within_resources(launch, tiles: Tiles, key: tuple, user_set: bool) -> Tiles:
    """Run ``launch(tiles)``; if the compiled kernel needs more shared memory than the GPU has
    (a mod's working set is not in the estimate of ``tiles.forward_tiles``), retry with
    ``tiles.smaller_tiles`` and remember the fit. User-chosen tiles are never changed: they get
    a clear error instead. Returns the tiles that ran."""
    first = tiles
    fitted = _FITTED_TILES.get((key, first))
    tiles = fitted or first
    while True:
        try:
            launch(tiles)
            break
        except triton.runtime.errors.OutOfResources as err:
            smaller = None if user_set else smaller_tiles(tiles)
            if smaller is None:
                raise ValueError(
                    f"The forward kernel with BLOCK_M={tiles.BLOCK_M}, BLOCK_N={tiles.BLOCK_N}, "
                    f"num_stages={tiles.num_stages} does not fit this GPU ({err}). "
                    + ("Choose smaller kernel_options tiles or fewer stages." if user_set else "")
                ) from err
            tiles = replace(smaller, reason=f"{tiles.reason}; shrunk after: {err}")
    if tiles is not fitted:
        _FITTED_TILES[(key, first)] = tiles
    return tiles


def choose_tiles(
    q,
    E,
    Ev,
    Lq,
    Lkv,
    q_block,
    kv_block,
    options,
    launch,
    target: DeviceLimits,
    masked=True,
    tile_gathers=False,
    page=0,
) -> Tiles:
    """The launch configuration: defaults from ``tiles.forward_tiles``, or the cached autotuned one."""
    capability, smem = target.capability, target.shared_memory
    tiles = forward_tiles(
        head_dim=E,
        v_head_dim=Ev,
        dtype=q.dtype,
        q_len=Lq,
        kv_len=Lkv,
        q_block=q_block,
        kv_block=kv_block,
        capability=capability,
        shared_memory_limit=smem,
        options=options,
        masked=masked,
        tile_gathers=tile_gathers,
    )
    if not options.autotune or capability is None:
        return tiles
    name = torch.cuda.get_device_name(q.device)
    key = (
        f"{name}|{q.dtype}|E{E}|Ev{Ev}|blk{q_block}x{kv_block}|Lq{Lq.bit_length()}|Lkv{Lkv.bit_length()}"
        f"|{'masked' if masked else 'unmasked'}{f'|page{page}' if page else ''}"
    )
    cache = TileCache("forward")
    cached = cache.get(key)
    if cached is not None:
        return cached
    best, best_ms = tiles, float("inf")
    for candidate in autotune_candidates(tiles, q_block, kv_block):
        try:
            ms = triton.testing.do_bench(lambda c=candidate: launch(c), warmup=5, rep=20)
        except triton.runtime.errors.OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = candidate, ms
    cache.put(key, best)
    return best
