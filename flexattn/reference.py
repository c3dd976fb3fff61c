"""The reference backend: FlexAttention's semantics in plain PyTorch, chunked over query rows.

It runs on any device, supports autograd (q, k, v and tensors captured by the score_mod), and is the
float64 oracle of every test. Memory stays bounded in the forward *and* the backward pass: each chunk
of query rows is an autograd Function that saves only its inputs and recomputes the chunk in
backward, so only one chunk's (B, Hq, rows, Lkv) intermediates exist at a time, never
B*Hq*Lq*Lkv. (torch.utils.checkpoint was measured to keep a score-sized tensor per chunk alive until
backward in torch 2.13.)

Per chunk (docs/architecture.md, "Semantics"):

    s = (q @ k^T) * scale                       # compute dtype (fp32; fp64 for fp64 inputs)
    s = score_mod(s, b, h, q_idx, kv_idx)       # vmap semantics, h = query head
    s = -inf where the block is not listed, or listed as partial and mask_mod is False
    lse = logsumexp(s); out = softmax(s) @ v    # a row with no allowed key: out 0, lse -inf
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from flexattn.block_mask import BlockMask
from flexattn.mod_eval import captured_grad_tensors, eval_mask_mod, eval_score_mod, index

# Elements of one (B, Hq, rows, Lkv) score chunk; a chunk's intermediates take ~10x this in bytes.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    compute_dtype: torch.dtype | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexAttention forward in chunked PyTorch, differentiable.

    Args:
        query: (B, Hq, Lq, E); key: (B, Hkv, Lkv, E); value: (B, Hkv, Lkv, Ev). Hq % Hkv == 0.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` or None. Inputs are validated by
            flexattn.api; this function trusts them.
        block_mask: BlockMask for (Lq, Lkv), or None (every pair allowed).
        scale: score scale, default 1/sqrt(E).
        enable_gqa: accepted for signature symmetry; GQA follows from Hq != Hkv.
        compute_dtype: dtype of the scores and softmax. Default fp32 (fp64 for fp64 inputs). Pass
            the input dtype for "eager in the test dtype", the middle leg of the three-way tests.
        chunk_elements: budget of score elements per chunk of query rows.
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse and max_scores (B, Hq, Lq) in fp32 (fp64 for fp64
        compute). max_scores carries no gradient.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, lse, mx = reference_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + (i - j))
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
    """
    B, Hq, Lq, E = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    if compute_dtype is None:
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    stat_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    blocks = _BlockRows(block_mask, Lkv) if block_mask is not None else None

    group = Hq // Hkv
    q5 = query.to(compute_dtype).reshape(B, Hkv, group, Lq, E)  # (B, Hkv, G, Lq, E)
    k5 = key.to(compute_dtype).unsqueeze(2)  # (B, Hkv, 1, Lkv, E)
    v5 = value.to(compute_dtype).unsqueeze(2)  # (B, Hkv, 1, Lkv, Ev)

    def chunk(q_chunk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int):
        rows = q_chunk.shape[3]
        s = (q_chunk @ k.transpose(-1, -2)).reshape(B, Hq, rows, Lkv) * scale  # (B, Hq, rows, Lkv)
        q_idx, kv_idx = index(start, start + rows, s.device), index(0, Lkv, s.device)
        if score_mod is not None:
            s = eval_score_mod(score_mod, s, q_idx, kv_idx).to(compute_dtype)
        if blocks is not None:
            allowed = blocks.allowed(B, Hq, q_idx, kv_idx)
            if allowed is not None:
                s = s.masked_fill(~allowed, -math.inf)
        m = s.detach().amax(dim=-1, keepdim=True)
        m = torch.where(m == -math.inf, 0.0, m)  # fully masked rows: keep exp() at 0, never NaN
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        empty = denom == 0
        denom = torch.where(empty, 1.0, denom)
        lse = torch.where(empty, -math.inf, m + torch.log(denom)).squeeze(-1)
        out = (p / denom).reshape(B, Hkv, group, rows, Lkv) @ v  # (B, Hkv, G, rows, Ev)
        return out.reshape(B, Hq, rows, -1), lse.to(stat_dtype), s.detach().amax(dim=-1).to(stat_dtype)

    rows = max(1, chunk_elements // max(1, B * Hq * Lkv))
    captures = _grad_captures(score_mod, query.device) if torch.is_grad_enabled() else []
    differentiable = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad or bool(captures)
    )
    outs, lses, maxes = [], [], []
    for start in range(0, Lq, rows):
        run = functools.partial(chunk, start=start)
        q_chunk = q5[:, :, :, start : start + rows]
        if differentiable:
            o, lse, mx = _RecomputedChunk.apply(run, q_chunk, k5, v5, *captures)
        else:
            with torch.no_grad():
                o, lse, mx = run(q_chunk, k5, v5)
        outs.append(o)
        lses.append(lse)
        maxes.append(mx)
    out = torch.cat(outs, dim=2).to(query.dtype)
    return out, torch.cat(lses, dim=2), torch.cat(maxes, dim=2)


def _grad_captures(score_mod: Callable | None, device: torch.device) -> list[torch.Tensor]:
    """Captured tensors of ``score_mod`` that require grad; errors if some cannot be found."""
    if score_mod is None:
        return []
    captures = captured_grad_tensors(score_mod)
    if not captures:
        zero, first = torch.zeros(1, 1, 1, 1, device=device), index(0, 1, device)
        if eval_score_mod(score_mod, zero, first, first).requires_grad:
            raise RuntimeError(
                f"score_mod {getattr(score_mod, '__name__', score_mod)!r} uses a tensor that requires grad "
                "but flexattn could not find it among the mod's closure variables, defaults, globals or "
                "module attributes. Capture it directly (e.g. as a closure variable or default argument)."
            )
    return captures


class _RecomputedChunk(torch.autograd.Function):
    """One chunk of query rows: forward without saving intermediates, backward by recomputation.

    Inputs: ``run(q_chunk, k, v) -> (out, lse, max_scores)``, then q_chunk, k, v and the score_mod's
    captured tensors that require grad (inputs of the Function, so gradients reach them).
    """

    @staticmethod
    def forward(ctx, run, q_chunk, k, v, *captures):
        ctx.run = run
        ctx.captures = captures  # the closure uses these very objects; keep them, not copies
        ctx.save_for_backward(q_chunk, k, v)
        with torch.no_grad():
            out, lse, max_scores = run(q_chunk, k, v)
        ctx.mark_non_differentiable(max_scores)
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, d_out, d_lse, _d_max):
        needs = ctx.needs_input_grad[1:]
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        wrt = [t for t, need in zip([*leaves, *ctx.captures], needs) if need]
        with torch.enable_grad():
            out, lse, _ = ctx.run(*leaves)
            pairs = [(t, d) for t, d in ((out, d_out), (lse, d_lse)) if t.requires_grad]
            if pairs:
                outputs, upstream = zip(*pairs)
                grads = torch.autograd.grad(outputs, wrt, upstream, allow_unused=True)
            else:  # e.g. a score_mod ignoring q and k: lse is constant and out needs no grad
                grads = [None] * len(wrt)
        grads = iter(grads)
        return (None, *(next(grads) if need else None for need in needs))


class _BlockRows:
    """Expands a BlockMask to per-element "allowed" rows for a chunk of query positions."""

    def __init__(self, block_mask: BlockMask, kv_len: int):
        self.mask_mod = block_mask.mask_mod
        self.q_block, self.kv_block = block_mask.BLOCK_SIZE
        self.full = block_mask._dense_blocks(full=True)  # (Bm, Hm, NQ, NKV)
        self.partial = block_mask._dense_blocks(full=False)
        self.everything_full = bool(self.full.all()) and not bool(self.partial.any())
        self.kv_blocks = torch.arange(kv_len, device=self.full.device) // self.kv_block  # (Lkv,)

    def allowed(self, B: int, H: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor | None:
        """bool (B or 1, H or 1, rows, Lkv), or None when every pair is allowed."""
        if self.everything_full:
            return None
        q_blocks = q_idx.long() // self.q_block
        full = self.full[:, :, q_blocks][..., self.kv_blocks]  # (Bm, Hm, rows, Lkv)
        partial = self.partial[:, :, q_blocks]
        if not bool(partial.any()):
            return full
        partial = partial[..., self.kv_blocks]
        return full | (partial & eval_mask_mod(self.mask_mod, B, H, q_idx, kv_idx))
