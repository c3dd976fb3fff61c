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

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flexattn.block_mask import BlockMask
from flexattn.mod_eval import eval_mask_mod, eval_score_mod, grad_captures, index

if TYPE_CHECKING:  # (the kernels package loads on first use)
    from flexattn.kernels.positions import Positions

# Elements of one (B, Hq, rows, Lkv) score chunk; a chunk's intermediates take ~10x this in bytes.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    positions: Positions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexAttention forward in chunked PyTorch, differentiable.

    Args:
        query: (B, Hq, Lq, E); key: (B, Hkv, Lkv, E); value: (B, Hkv, Lkv, Ev). Hq % Hkv == 0.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` or None. Inputs are validated by
            flexattn.api; this function trusts them.
        block_mask: BlockMask for (Lq, Lkv), or None (every pair allowed).
        scale: score scale, default 1/sqrt(E). GQA follows from the shapes (Hq a multiple of Hkv).
        compute_dtype: dtype of the scores and softmax. Default fp32 (fp64 for fp64 inputs). Pass
            the input dtype for "eager in the test dtype", the middle leg of the three-way tests.
        chunk_elements: budget of score elements per chunk of query rows.
        positions: query token i of batch b at position ``q_offset[b] + i`` (the mods and the block
            mask, built for the whole sequence, see that position); sequence b has ``kv_lengths[b]``
            keys. Checked by flexattn.api (kv_offset 0). Runs one sequence at a time.
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse and max_scores (B, Hq, Lq) in fp32 (fp64 for fp64
        compute). max_scores carries no gradient.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> out, lse, mx = reference_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + (i - j))
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
    """
    if positions is not None and not positions.is_default:
        return _per_sequence(query, key, value, score_mod, block_mask, scale, compute_dtype, chunk_elements,
                             positions)  # fmt: skip
    return _attention(query, key, value, score_mod, block_mask, scale, compute_dtype, chunk_elements)


def _per_sequence(query, key, value, score_mod, block_mask, scale, compute_dtype, chunk_elements, positions):
    """Each sequence on its own: its query offset, its keys, the mods told which sequence it is."""
    results = []
    for b in range(query.shape[0]):
        offset = positions.q_offset
        offset = int(offset[b]) if isinstance(offset, torch.Tensor) else int(offset)
        keys = key.shape[2] if positions.kv_lengths is None else int(positions.kv_lengths[b])
        if keys == 0:  # no keys: every row fully masked
            stat = torch.float64 if (compute_dtype or query.dtype) == torch.float64 else torch.float32
            empty = torch.full(query[b : b + 1].shape[:3], -math.inf, dtype=stat, device=query.device)
            out = query.new_zeros(*query.shape[:3], value.shape[-1])[b : b + 1]
            results.append((out, empty, empty.clone()))
            continue
        results.append(
            _attention(
                query[b : b + 1], key[b : b + 1, :, :keys], value[b : b + 1, :, :keys],
                _in_batch(score_mod, b, has_score=True), block_mask, scale, compute_dtype, chunk_elements,
                q_offset=offset, batch=b,
            )
        )  # fmt: skip
    return tuple(torch.cat(parts) for parts in zip(*results))


def _in_batch(mod: Callable | None, batch: int | None, has_score: bool) -> Callable | None:
    """``mod`` seeing batch index ``batch`` where it is evaluated on a one-sequence slice."""
    if mod is None or not batch:
        return mod
    if has_score:
        return lambda s, b, h, q_idx, kv_idx: mod(s, b + batch, h, q_idx, kv_idx)
    return lambda b, h, q_idx, kv_idx: mod(b + batch, h, q_idx, kv_idx)


def _attention(query, key, value, score_mod, block_mask, scale, compute_dtype, chunk_elements,
               q_offset: int = 0, batch: int | None = None):  # fmt: skip
    """The reference forward for query rows at positions ``q_offset + i``; ``batch``: the sequence
    a one-sequence slice is (None: the whole batch)."""
    B, Hq, Lq, E = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    if compute_dtype is None:
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    stat_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    blocks = _BlockRows(block_mask, Lkv, batch) if block_mask is not None else None

    group = Hq // Hkv
    q5 = query.to(compute_dtype).reshape(B, Hkv, group, Lq, E)  # (B, Hkv, G, Lq, E)
    k5 = key.to(compute_dtype).unsqueeze(2)  # (B, Hkv, 1, Lkv, E)
    v5 = value.to(compute_dtype).unsqueeze(2)  # (B, Hkv, 1, Lkv, Ev)

    def chunk(q_chunk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int):
        rows = q_chunk.shape[3]
        first = q_offset + start
        q_idx, kv_idx = index(first, first + rows, q_chunk.device), index(0, Lkv, q_chunk.device)
        columns = blocks.columns(first, first + rows) if blocks is not None else None
        if columns is not None:  # only the kv positions of visited blocks (a sparse mask's savings)
            kv_idx = columns
            k, v = k.index_select(3, columns), v.index_select(3, columns)
        cols = kv_idx.shape[0]
        if cols == 0:  # no block visited by these rows: all fully masked
            out = q_chunk.new_zeros(B, Hkv, group, rows, v.shape[-1])
            empty = torch.full((B, Hq, rows), -math.inf, dtype=stat_dtype, device=q_chunk.device)
            return out, empty, empty.clone()
        s = (q_chunk @ k.transpose(-1, -2)).reshape(B, Hq, rows, cols) * scale  # (B, Hq, rows, cols)
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
        out = (p / denom).reshape(B, Hkv, group, rows, cols) @ v  # (B, Hkv, G, rows, Ev)
        return out, lse.to(stat_dtype), s.detach().amax(dim=-1).to(stat_dtype)

    rows = max(1, chunk_elements // max(1, B * Hq * Lkv))
    if blocks is not None and rows >= blocks.q_block:
        rows = blocks.q_block  # one q block per chunk keeps its visited columns tight
    if torch.compiler.is_compiling():
        # Dynamo traces the mods itself (their captured tensors become graph inputs, their numbers
        # guards) and AOTAutograd derives the backward of the plain chunk loop.
        out, lse, max_scores = _forward_chunks(chunk, rows, q5, k5, v5)
        return out.reshape(B, Hq, Lq, -1).to(query.dtype), lse, max_scores.detach()
    captures = grad_captures(score_mod, query.device) if torch.is_grad_enabled() else []
    differentiable = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad or bool(captures)
    )
    if differentiable:
        out, lse, max_scores = _ChunkedAttention.apply(chunk, rows, q5, k5, v5, *captures)
    else:
        with torch.no_grad():
            out, lse, max_scores = _forward_chunks(chunk, rows, q5, k5, v5)
    return out.reshape(B, Hq, Lq, -1).to(query.dtype), lse, max_scores


def _forward_chunks(chunk: Callable, rows: int, q5: torch.Tensor, k5: torch.Tensor, v5: torch.Tensor):
    """Run ``chunk`` over query rows, writing into outputs allocated once (no per-chunk leftovers
    between the large temporaries, which would fragment the heap)."""
    B, Hkv, group, Lq, _ = q5.shape
    stat_dtype = torch.float64 if q5.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Hkv, group, Lq, v5.shape[-1], dtype=q5.dtype, device=q5.device)
    lse = torch.empty(B, Hkv * group, Lq, dtype=stat_dtype, device=q5.device)
    max_scores = torch.empty_like(lse)
    for start in range(0, Lq, rows):
        stop = min(start + rows, Lq)
        out[:, :, :, start:stop], lse[:, :, start:stop], max_scores[:, :, start:stop] = chunk(
            q5[:, :, :, start:stop], k5, v5, start
        )
    return out, lse, max_scores


class _ChunkedAttention(torch.autograd.Function):
    """Chunked attention that saves only its inputs; backward recomputes one chunk at a time.

    Inputs: ``chunk(q_chunk, k, v, start) -> (out, lse, max_scores)``, the rows per chunk, q5, k5,
    v5 and the score_mod's captured tensors that require grad (inputs of the Function, so their
    gradients flow on to whatever produced them).
    """

    @staticmethod
    def forward(ctx, chunk, rows, q5, k5, v5, *captures):
        ctx.chunk, ctx.rows = chunk, rows
        ctx.captures = captures  # the closure uses these very objects; keep them, not copies
        ctx.save_for_backward(q5, k5, v5, *captures)  # captures too: in-place edits before backward raise
        with torch.no_grad():
            out, lse, max_scores = _forward_chunks(chunk, rows, q5, k5, v5)
        ctx.mark_non_differentiable(max_scores)
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, d_out, d_lse, _d_max):
        q5, k5, v5, *_ = ctx.saved_tensors  # (autograd's version check of every saved tensor)
        needs = ctx.needs_input_grad[2:]
        # Gradient accumulators, allocated before the loop; None where no gradient is wanted.
        grads = [torch.zeros_like(t) if need else None for t, need in zip([q5, k5, v5, *ctx.captures], needs)]
        k_leaf, v_leaf = (t.detach().requires_grad_(need) for t, need in zip((k5, v5), needs[1:3]))
        for start in range(0, q5.shape[3], ctx.rows):
            stop = min(start + ctx.rows, q5.shape[3])
            q_leaf = q5[:, :, :, start:stop].detach().requires_grad_(needs[0])
            leaves = [q_leaf, k_leaf, v_leaf, *ctx.captures]
            wrt = [t for t, need in zip(leaves, needs) if need]
            with torch.enable_grad():
                out, lse, _ = ctx.chunk(q_leaf, k_leaf, v_leaf, start)
                pairs = [(t, d) for t, d in ((out, d_out), (lse, d_lse)) if t.requires_grad]
                if not pairs:  # e.g. a score_mod ignoring q and k: nothing here depends on inputs
                    continue
                outputs = [t for t, _ in pairs]
                upstream = [d[..., start:stop, :] if d.dim() == 5 else d[..., start:stop] for _, d in pairs]
                chunk_grads = iter(torch.autograd.grad(outputs, wrt, upstream, allow_unused=True))
            for i, need in enumerate(needs):
                g = next(chunk_grads) if need else None
                if g is None:
                    continue
                if i == 0:
                    grads[0][:, :, :, start:stop] += g
                else:
                    grads[i] += g
        return (None, None, *grads)


class _BlockRows:
    """Expands a BlockMask to per-element "allowed" pairs for a chunk of query positions."""

    def __init__(self, block_mask: BlockMask, kv_len: int, batch: int | None = None):
        """``batch``: the sequence a one-sequence slice is (its block rows; the mask_mod sees it),
        None for the whole batch."""
        self.mask_mod = _in_batch(block_mask.mask_mod, batch, has_score=False)
        self.q_block, self.kv_block = block_mask.BLOCK_SIZE
        self.full = block_mask._dense_blocks(full=True)  # (Bm, Hm, NQ, NKV)
        self.partial = block_mask._dense_blocks(full=False)
        if batch is not None and self.full.shape[0] > 1:
            self.full, self.partial = self.full[batch : batch + 1], self.partial[batch : batch + 1]
        nkv = -(-kv_len // self.kv_block)  # a shorter sequence (ragged batch) uses its first blocks
        self.full, self.partial = self.full[..., :nkv], self.partial[..., :nkv]
        # Under torch.compile the host reads below would break the graph: every block is then
        # visited and the mask evaluated everywhere (the same values, no skipping).
        self.traced = torch.compiler.is_compiling()
        self.everything_full = not self.traced and bool(self.full.all()) and not bool(self.partial.any())
        self.visited = (self.full | self.partial).flatten(0, 1).any(dim=0)  # (NQ, NKV), any b / h
        self.kv_len = kv_len

    def columns(self, start: int, stop: int) -> torch.Tensor | None:
        """int32 kv positions in blocks that query rows start:stop visit (None: all of them).

        Scores outside them would be masked anyway; skipping them is what makes the mask sparse.
        """
        if self.everything_full or self.traced:
            return None
        rows_visit = self.visited[start // self.q_block : (stop - 1) // self.q_block + 1].any(dim=0)
        if bool(rows_visit.all()):
            return None
        positions = torch.arange(self.kv_len, device=rows_visit.device)
        return positions[rows_visit[positions // self.kv_block]].to(torch.int32)

    def allowed(self, B: int, H: int, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor | None:
        """bool (B or 1, H or 1, rows, cols) for the given positions, or None when all are allowed."""
        if self.everything_full:
            return None
        q_blocks = q_idx.long() // self.q_block
        kv_blocks = kv_idx.long() // self.kv_block
        full = self.full[:, :, q_blocks][..., kv_blocks]  # (Bm, Hm, rows, cols)
        partial = self.partial[:, :, q_blocks][..., kv_blocks]
        if not self.traced and not bool(partial.any()):
            return full
        return full | (partial & eval_mask_mod(self.mask_mod, B, H, q_idx, kv_idx))
