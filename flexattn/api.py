"""flex_attention: the public entry point. Validate -> normalise -> dispatch; no math here.

Drop-in for ``torch.nn.attention.flex_attention.flex_attention``: same names, signature, defaults
and return conventions. Every invalid input raises an error naming the argument, the bad value and
the fix, before any work is done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from flexattn import call_cache
from flexattn.block_mask import BlockMask, check_attention_block_size, noop_mask, sliced_mask_mod_error
from flexattn.dispatch import check_call, check_mods_on_grid, run_attention
from flexattn.options import KernelOptions, parse_options

if TYPE_CHECKING:  # (the kernels package loads on first use: import flexattn stays cheap)
    from flexattn.kernels.positions import Positions

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=AuxRequest(...))`` returns."""

    lse: bool = False
    max_scores: bool = False


_NOTHING_AUX, _LSE_ONLY = AuxRequest(), AuxRequest(lse=True)  # (immutable: shared by every call)


class AuxOutput(NamedTuple):
    """Auxiliary outputs: ``lse`` and ``max_scores`` (B, Hq, Lq) fp32, or None if not requested."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
    *,
    return_aux: AuxRequest | None = None,
    positions: Positions | None = None,
):
    """Attention with a user-defined score_mod and a block-sparse mask.

    For every (b, h, i, j): ``s = score_mod((q[b,h,i] . k[b,hk,j]) * scale, b, h, i, j)``, masked to
    -inf where ``block_mask`` disallows (i, j); ``out[b,h,i] = softmax_j(s) @ v[b,hk]`` with
    ``hk = h // (Hq // Hkv)``. A row with no allowed key gives out = 0 and lse = -inf.

    Args:
        query: (B, Hq, Lq, E); key: (B, Hkv, Lkv, E); value: (B, Hkv, Lkv, Ev). fp16, bf16, fp32 or
            fp64, all the same dtype and device.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on 0-dim tensors (score fp32,
            indices int32; h is the query head), or None.
        block_mask: from :func:`create_block_mask` for (Lq, Lkv) (PyTorch's BlockMask is accepted
            too); None attends everywhere.
        scale: finite float; default 1/sqrt(E).
        enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention).
        return_lse: also return the logsumexp (prefer ``return_aux``).
        kernel_options: dict of kernel knobs, see :class:`flexattn.KernelOptions`.
        return_aux: ``AuxRequest(lse=..., max_scores=...)``.
        positions: (flexattn extension, keyword only) where the rows sit, for decoding and chunked
            prefill: query token i of batch b is position ``q_offset[b] + i`` (the mods see it), sequence
            b has ``kv_lengths[b]`` keys of the (padded) key tensors. A block_mask is then built for the
            whole sequence (Q_LEN >= last query position + 1, KV_LEN = Lkv) and read at the absolute
            positions. Inference only (no gradients); kv_offset must be 0. See :class:`Positions`.
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; ``(out, lse)`` with ``return_lse``;
        ``(out, AuxOutput(lse, max_scores))`` with ``return_aux``. lse / max_scores: fp32 (B, Hq, Lq).

    Example:
        >>> q, k, v = (torch.randn(2, 4, 100, 32) for _ in range(3))
        >>> causal = create_block_mask(lambda b, h, i, j: i >= j, None, None, 100, 100, device="cpu")
        >>> alibi = lambda s, b, h, i, j: s - 0.1 * (i - j)
        >>> out = flex_attention(q, k, v, score_mod=alibi, block_mask=causal)
        >>> out.shape
        torch.Size([2, 4, 100, 32])
    """
    request = _check_returns(return_lse, return_aux)
    compiling = torch.compiler.is_compiling()
    # an eager inference call repeated with tensors of the same kind: its kept launches (call_cache.py)
    call = None
    if not compiling:
        prepared, call = call_cache.lookup(
            query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, positions,
            lse=request.lse, max_scores=request.max_scores,
        )  # fmt: skip
        if prepared is not None:
            return _pack(*prepared, request, return_lse, return_aux)
    block_mask = _from_pytorch_block_mask(block_mask)
    kv_pages = getattr(block_mask, "kv_pages", None)  # a paged cache (flexattn.paged.PagedBlockMask)
    _check_tensors(query, key, value, enable_gqa, paged=kv_pages is not None)
    scale = _check_scale(scale, query.shape[-1])  # traced under torch.compile: a new scale is an input
    kv_len = key.shape[2]
    if kv_pages is not None:
        kv_len = _check_paged(kv_pages, query, key, value)
    positions, q_end = _check_positions(positions, query, kv_len, compiling)
    if block_mask is not None:
        _check_block_mask(block_mask, query, kv_len, positions is not None, q_end)
    mask_mod = None if block_mask is None else block_mask.mask_mod
    if compiling:
        import flexattn.custom_ops  # noqa: F401  (marks check_call as a trace-time constant)
    # eager calls parse the options once, here; traced ones hand check_call the user's dict (a constant)
    options = kernel_options if compiling else parse_options(kernel_options)
    backend, tiles = check_call(score_mod, mask_mod, options, query.device, query.dtype)
    if block_mask is not None:  # traced under torch.compile (block sizes may be symbolic there)
        _check_tiles(tuple(block_mask.BLOCK_SIZE), tiles)
    if kv_pages is not None and compiling:
        raise ValueError(
            "flex_attention over a paged KV cache runs eagerly for now: call it outside torch.compile "
            "(or wrap the call in torch.compiler.disable)."
        )
    if backend == "TRITON" and compiling:
        # torch.compile: the custom ops (no graph break), with the mods' captures as graph inputs
        from flexattn.custom_ops import traced_attention

        out, lse, max_scores = traced_attention(
            query, key, value, score_mod, block_mask, scale, kernel_options
        )
    else:
        options = KernelOptions.from_user(options)  # as it is when eager; parsed here when traced
        q_len = _trace_q_len(positions, q_end, block_mask, query, kv_len)
        known = None if call is None else call.fingerprints
        fingerprints = _check_mods_trace(score_mod, mask_mod, query, kv_len, q_len, known)
        call = call if backend == "TRITON" else None
        if call is not None and call.record and call.offset_bound is not None and call.offset_bound > q_len:
            call = _checked_for_every_offset(call, score_mod, mask_mod, query, kv_len, fingerprints)
        with call_cache.recording(call) as launches:
            out, lse, max_scores = run_attention(
                query, key, value, score_mod, block_mask, scale, options, backend, kv_pages=kv_pages,
                fingerprints=fingerprints, positions=positions, need_max_scores=request.max_scores,
            )  # fmt: skip
        call_cache.remember(call, launches, (out, lse, max_scores), options, query.dtype)
    return _pack(out, lse, max_scores, request, return_lse, return_aux)


def _pack(out, lse, max_scores, request: AuxRequest, return_lse, return_aux):
    if return_aux is not None:
        return out, AuxOutput(lse if request.lse else None, max_scores if request.max_scores else None)
    if return_lse:
        return out, lse
    return out


def _check_tensors(query, key, value, enable_gqa, paged: bool = False) -> None:
    """``paged``: key / value are paged caches (1, Hkv, rows, E): their batch broadcasts."""
    names = ("query", "key", "value")
    for name, t in zip(names, (query, key, value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, L, E), got shape {tuple(t.shape)}. "
                "Add a batch or head dim with .unsqueeze(0) / .unsqueeze(1), or reshape."
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}. Convert with .to(torch.float32)."
            )
        if 0 in t.shape:
            raise ValueError(
                f"{name} has an empty dimension: shape {tuple(t.shape)}. Every size must be >= 1."
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}. "
            "Convert them, e.g. key.to(query.dtype)."
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}. "
            "Move them with .to(query.device)."
        )
    (B, Hq, _, E), (Bk, Hkv, Lkv, Ek), (Bv, Hv, Lv, _) = query.shape, key.shape, value.shape
    if paged:
        Bk = Bv = B  # checked by _check_paged (the caches have batch 1)
    if not B == Bk == Bv:
        raise ValueError(f"Batch sizes differ: query B={B}, key B={Bk}, value B={Bv}. They must be equal.")
    if Ek != E:
        raise ValueError(
            f"query and key must share the head dim E, got query E={E} and key E={Ek} "
            "(value's Ev may differ)."
        )
    if (Hkv, Lkv) != (Hv, Lv):
        raise ValueError(
            f"key and value must have the same heads and length, got key (H={Hkv}, L={Lkv}) and "
            f"value (H={Hv}, L={Lv})."
        )
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {enable_gqa!r}.")
    if Hq != Hkv and not enable_gqa:
        raise ValueError(
            f"query has Hq={Hq} heads but key/value have Hkv={Hkv}. Pass enable_gqa=True for "
            "grouped-query attention, or give key/value as many heads as query."
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"With enable_gqa=True, Hq must be a multiple of Hkv, got Hq={Hq}, Hkv={Hkv} "
            f"(Hq % Hkv = {Hq % Hkv}). Use a number of query heads divisible by the key/value heads."
        )


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}: {scale!r}.")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}. Pass a finite float, or None for 1/sqrt(E).")
    return float(scale)


def _from_pytorch_block_mask(block_mask):
    """Accept a ``torch.nn.attention.flex_attention.BlockMask`` too: same fields, our dataclass."""
    if isinstance(block_mask, BlockMask) or type(block_mask).__name__ != "BlockMask":
        return block_mask
    return BlockMask.from_pytorch(block_mask)


def _check_paged(kv_pages, query, key, value) -> int:
    """Checks of a paged call (``block_mask`` from ``PagedAttention.convert_logical_block_mask``);
    returns its logical key length."""
    try:
        kv_pages.check(key, value, query.shape[0])
    except ValueError as err:
        raise ValueError(
            f"flex_attention with a paged block mask: {err}. Pass the paged caches as key / value and "
            "convert the mask for this batch (PagedAttention.convert_logical_block_mask(mask, batch_idx))."
        ) from None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError(
            "flex_attention over a paged KV cache is inference only (no backward): run it under "
            "torch.no_grad(), or detach query / key / value."
        )
    return kv_pages.kv_len


def _check_block_mask(
    block_mask, query, kv_len: int, positions: bool = False, q_end: int | None = None
) -> None:
    """Shape, broadcast and device checks of a BlockMask against query and the key length. With
    ``positions`` the mask is built for the whole sequence; ``q_end``: one past the last query
    position, if known."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            "block_mask must be a flexattn.BlockMask (from create_block_mask), "
            f"got {type(block_mask).__name__}."
        )
    B, Hq, Lq, _ = query.shape
    Lkv = kv_len
    if positions:
        mask_q, mask_kv = block_mask.seq_lengths
        if mask_q < (q_end or Lq) or mask_kv != Lkv:
            raise ValueError(
                f"With positions, block_mask is indexed by absolute positions: build it for the whole "
                f"sequence, Q_LEN >= {q_end or Lq} (the last query position + 1) and KV_LEN = {Lkv} (the key "
                f"tensors' length); got (Q_LEN, KV_LEN)={tuple(block_mask.seq_lengths)}."
            )
        Lq = mask_q
    elif tuple(block_mask.seq_lengths) != (Lq, Lkv):
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN)={tuple(block_mask.seq_lengths)} but query/key have "
            f"Lq={Lq}, Lkv={Lkv}. Build a new mask with create_block_mask(..., Q_LEN={Lq}, KV_LEN={Lkv}), "
            f"or, for a shorter mask, block_mask._adjust({Lq}, {Lkv})."
        )
    q_block, kv_block = block_mask.BLOCK_SIZE
    want = (-(-Lq // q_block), -(-Lkv // kv_block))
    if tuple(block_mask.kv_indices.shape[-2:]) != want:
        raise ValueError(
            f"block_mask's kv_indices have {tuple(block_mask.kv_indices.shape[-2:])} (NQ, NKV) blocks, but "
            f"BLOCK_SIZE={block_mask.BLOCK_SIZE} and lengths ({Lq}, {Lkv}) need {want}. "
            "Rebuild it with create_block_mask."
        )
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(
            f"block_mask has (B, H)=({Bm}, {Hm}) but query has B={B}, Hq={Hq}; each must match or be 1 "
            "(build with B=None / H=None to broadcast)."
        )
    if block_mask.kv_num_blocks.device != query.device:
        raise ValueError(
            f"block_mask is on {block_mask.kv_num_blocks.device} but query is on {query.device}. "
            f"Use block_mask.to({str(query.device)!r}) or build it with device={str(query.device)!r}."
        )
    if block_mask.mask_mod is sliced_mask_mod_error:
        raise ValueError(
            "block_mask was sliced with [] and has no mask_mod for the slice. Set `block_mask.mask_mod` "
            "to a mod that fits the slice's b / h / q_idx (see BlockMask.__getitem__)."
        )


def _check_positions(positions, query, kv_len: int, compiling: bool) -> tuple[Positions | None, int | None]:
    """Checked positions (None for the default) and one past the last query position (None: Lq, or
    not known without reading GPU tensors: ``Positions.check`` reads no GPU values)."""
    if positions is None:
        return None, None
    from flexattn.kernels.positions import Positions

    if not isinstance(positions, Positions):
        raise TypeError(
            "positions must be a flexattn.Positions(q_offset=..., kv_lengths=...), "
            f"got {type(positions).__name__}."
        )
    if compiling:
        raise ValueError(
            "positions are not supported under torch.compile yet; call flex_attention eagerly for decoding."
        )
    positions.check(query.shape[0], kv_len, query.device)
    if positions.kv_offset != 0:
        raise ValueError(
            f"Positions.kv_offset={positions.kv_offset} is not supported yet (keys start at position 0); "
            "pass kv_offset=0."
        )
    if positions.is_default:
        return None, None
    return positions, positions.q_end(query.shape[2])


def _trace_q_len(positions, q_end, block_mask, query, kv_len: int) -> int:
    """The query positions the mods are checked over: Lq, or with positions one past the last
    (when not known without a GPU read: the mask's Q_LEN, else the longer of Lq and Lkv)."""
    if positions is None:
        return query.shape[2]
    if q_end is not None:
        return q_end
    return block_mask.seq_lengths[0] if block_mask is not None else max(query.shape[2], kv_len)


def _checked_for_every_offset(call, score_mod, mask_mod, query, kv_len: int, fingerprints):
    """``call`` if its mods pass their index checks over every query position a hit of its key may
    pass as an int q_offset (``call.offset_bound``), else None: such a call runs the whole path
    (and its checks at its own offset) every time."""
    from flexattn.compiler.errors import ModCompileError, ModIndexError

    try:
        _check_mods_trace(score_mod, mask_mod, query, kv_len, call.offset_bound, fingerprints)
    except (ModIndexError, ModCompileError):
        return None
    return call


def _check_mods_trace(score_mod, mask_mod, query, kv_len: int, q_len: int | None = None, known=None):
    """The compiler's trace-time refusals, on every backend alike (flexattn.compiler.checks), over
    query positions ``[0, q_len)`` (default Lq).

    Returns the mods' ``CallFingerprints`` (``known``, if this call computed them already): the
    Triton path compiles them with the same keys."""
    q_len = query.shape[2] if q_len is None else q_len
    grid = (query.shape[0], query.shape[1], q_len, kv_len)  # (B, Hq, Lq, Lkv)
    if torch.compiler.is_compiling():  # the same checks, run once at trace time (custom_ops marks it)
        check_mods_on_grid(score_mod, mask_mod, grid, query.device)
        return None
    from flexattn.compiler.fingerprint import CallFingerprints, fingerprint  # (loads on first use)

    fingerprints = known
    if fingerprints is None:
        score = None if score_mod is None else fingerprint(score_mod)
        mask = None if mask_mod is None or mask_mod is noop_mask else fingerprint(mask_mod)
        fingerprints = CallFingerprints(score, mask)
    check_mods_on_grid(score_mod, mask_mod, grid, query.device, fingerprints)
    return fingerprints


def _check_tiles(block_size: tuple[int, int], tiles: tuple[int | None, int | None]) -> None:
    """Block sizes every backend accepts; kernel tiles ``(BLOCK_M, BLOCK_N)`` from kernel_options
    that divide them."""
    check_attention_block_size(block_size)
    (q_block, kv_block), (block_m, block_n) = block_size, tiles
    for name, size, block in (("BLOCK_M", block_m, q_block), ("BLOCK_N", block_n, kv_block)):
        if size is not None and block % size != 0:
            raise ValueError(
                f"kernel_options['{name}']={size} must divide the block mask's block size {block} "
                f"(BLOCK_SIZE={block_size}). Pick a divisor, or rebuild the mask with another BLOCK_SIZE."
            )


def _check_returns(return_lse, return_aux) -> AuxRequest:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}.")
    if return_aux is None:
        return _LSE_ONLY if return_lse else _NOTHING_AUX
    if return_lse:
        raise ValueError(
            "Pass either return_lse=True or return_aux=AuxRequest(...), not both; "
            "use return_aux=AuxRequest(lse=True) instead of return_lse."
        )
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(
            f"return_aux must be an AuxRequest(lse=..., max_scores=...), got {type(return_aux).__name__}."
        )
    return return_aux
