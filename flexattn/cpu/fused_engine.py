"""The CPU engine for any score_mod: chunked matmul + mod + softmax in fp32, LSE-only backward.

For mods SDPA's mask argument cannot carry (soft-capping's ``tanh``, anything that is not
``score + f``), for learnable captured tensors (SDPA's backward gives no score gradient) and for
``max_scores``. Per chunk of query rows (``flexattn.cpu.chunks``), over its visited keys only::

    s = (q @ k^T) * scale; s = score_mod(s, ...) (vmap); s = -inf where not allowed   # fp32
    m = max(s); p = exp(s - m) (in place); l = sum(p); out = (p @ v) / l; lse = m + log(l)

The forward saves only out and lse. The backward recomputes ``s`` per chunk, ``p = exp(s - lse)``,
``dS = p * (dout @ v^T - delta)`` with ``delta = rowsum(dout * out) - dlse``, and pulls dS through
the score_mod with autograd (to the raw score and the learnable captures), then
``dq = dS_raw @ k * scale``, ``dk += dS_raw^T @ q * scale``, ``dv += p^T @ dout``.
Inputs are converted to fp32 once per call. Rows with no allowed key: out 0, lse -inf, zero grads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flexattn.cpu.chunk_masks import ChunkMasks, apply_mask
from flexattn.cpu.chunks import Chunk
from flexattn.mod_eval import eval_score_mod, index

# Score elements (B * Hq * rows * cols) per step of a chunk: rows are cut to fit.
STEP_ELEMENTS = 1 << 21


class FusedRun:
    """One call's chunks, masks, score_mod and scale."""

    def __init__(self, chunks: list[Chunk], masks: ChunkMasks, score_mod: Callable | None, scale: float):
        self.chunks, self.masks, self.score_mod, self.scale = chunks, masks, score_mod, scale

    def steps(self, B: int, Hq: int):
        """``(chunk, rows)`` pieces: each chunk cut into row ranges of about STEP_ELEMENTS scores."""
        for c in self.chunks:
            per_row = max(1, B * Hq * c.cols)
            rows = max(1, STEP_ELEMENTS // per_row)
            for start in range(c.start, c.stop, rows):
                yield c, slice(start, min(start + rows, c.stop))

    def scores(self, q5, k5, c: Chunk, rows: slice, mask, grad: bool = False):
        """``(raw, modded)`` fp32 (B, Hq, r, cols) scores of query rows ``rows`` of chunk ``c``;
        ``modded`` is masked to -inf by ``mask`` (the chunk's additive mask, or None), and is
        differentiable in ``raw`` and the captures if ``grad``."""
        B, Hkv, G, _, _ = q5.shape
        r = rows.stop - rows.start
        raw = (q5[:, :, :, rows] @ c.take(k5.squeeze(2)).unsqueeze(2).transpose(-1, -2)).view(
            B, Hkv * G, r, -1
        )
        raw.mul_(self.scale)
        s = raw
        if self.score_mod is not None:
            if grad:
                raw.requires_grad_()
            q_idx = index(rows.start, rows.stop, raw.device)
            s = eval_score_mod(self.score_mod, raw, q_idx, c.kv_positions(raw.device)).to(torch.float32)
        if mask is not None:
            s = apply_mask(s, mask[:, :, rows.start - c.start : rows.stop - c.start])
        return raw, s


def fused_forward(run: FusedRun, q, k, v, want_max: bool):
    """``(out (B, Hq, Lq, Ev) q's dtype, lse (B, Hq, Lq) fp32, max_scores or None)``."""
    B, Hq, Lq, _ = q.shape
    Hkv, Ev = k.shape[1], v.shape[-1]
    q5, k5, v5 = _as_fp32_groups(q, k, v)
    out = torch.zeros(B, Hkv, Hq // Hkv, Lq, Ev, dtype=torch.float32, device="cpu")
    lse = torch.full((B, Hq, Lq), -math.inf, device="cpu")
    max_scores = torch.full((B, Hq, Lq), -math.inf, device="cpu") if want_max else None
    mask, current = None, None
    for c, rows in run.steps(B, Hq):
        if c.cols == 0:
            continue
        if c is not current:
            mask, current = run.masks.mask(c), c
        with torch.no_grad():
            _, s = run.scores(q5, k5, c, rows, mask)
        m = s.amax(dim=-1, keepdim=True)
        if want_max:
            max_scores[:, :, rows] = m.squeeze(-1)
        m = m.masked_fill_(torch.isneginf(m), 0.0)
        p = s.sub_(m).exp_() if s.is_contiguous() else (s - m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = p.view(B, Hkv, Hq // Hkv, *p.shape[2:]) @ c.take(v5.squeeze(2)).unsqueeze(2)
        empty = denom == 0
        out[:, :, :, rows] = o / denom.masked_fill(empty, 1.0).view(B, Hkv, Hq // Hkv, -1, 1)
        lse[:, :, rows] = (m + denom.log()).squeeze(-1)
    return out.view(B, Hq, Lq, Ev).to(q.dtype), lse, max_scores


def fused_backward(run: FusedRun, q, k, v, out, lse, dout, dlse, captures):
    """``(dq, dk, dv, *dcaptures)``: q, k, v's dtypes; capture gradients None where unused."""
    B, Hq, Lq, E = q.shape
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    q5, k5, v5 = _as_fp32_groups(q, k, v)
    do5 = dout.to(torch.float32).view(B, Hkv, G, Lq, -1)
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1)  # (B, Hq, Lq)
    if dlse is not None:
        delta = delta - dlse
    lse_safe = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows with no key: every score is -inf
    dq = torch.zeros_like(q5)
    dk, dv = torch.zeros_like(k5), torch.zeros_like(v5)
    dcaps = [None] * len(captures)
    mask, current = None, None
    for c, rows in run.steps(B, Hq):
        if c.cols == 0:
            continue
        if c is not current:
            mask, current = run.masks.mask(c), c
        need_mod_grad = run.score_mod is not None
        with torch.enable_grad() if need_mod_grad else torch.no_grad():
            raw, s = run.scores(q5, k5, c, rows, mask, grad=need_mod_grad)
        r = rows.stop - rows.start
        p = (s.detach() - lse_safe[:, :, rows, None]).exp_()  # (B, Hq, r, cols)
        kc, vc = c.take(k5.squeeze(2)), c.take(v5.squeeze(2))  # (B, Hkv, cols, E / Ev)
        p5 = p.view(B, Hkv, G, r, -1)
        do_c = do5[:, :, :, rows]
        dv_c = (p5.transpose(-1, -2) @ do_c).sum(2)  # (B, Hkv, cols, Ev)
        dp = (do_c @ vc.unsqueeze(2).transpose(-1, -2)).view(B, Hq, r, -1)
        ds = p.mul_(dp.sub_(delta[:, :, rows, None]))
        if need_mod_grad and not s.requires_grad:  # the mod ignores the score and the captures
            ds = torch.zeros_like(ds)
        elif need_mod_grad:
            wrt = [raw, *captures]
            grads = torch.autograd.grad(s, wrt, ds, allow_unused=True)
            ds = grads[0] if grads[0] is not None else torch.zeros_like(raw)
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    dcaps[i] = g if dcaps[i] is None else dcaps[i] + g
        ds5 = ds.view(B, Hkv, G, r, -1)
        dq[:, :, :, rows] = (ds5 @ kc.unsqueeze(2)) * run.scale
        dk_c = (ds5.transpose(-1, -2) @ q5[:, :, :, rows]).sum(2) * run.scale
        _add_columns(dk, c, dk_c)
        _add_columns(dv, c, dv_c)
    dq = dq.view(B, Hq, Lq, E).to(q.dtype)
    return (dq, dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype), *dcaps)


def _add_columns(acc5: torch.Tensor, c: Chunk, grad: torch.Tensor) -> None:
    """acc5 (B, Hkv, 1, Lkv, D) += grad (B, Hkv, cols, D) at the chunk's key positions."""
    acc = acc5.squeeze(2)
    if isinstance(c.columns, slice):
        acc[:, :, c.columns] += grad
    else:
        acc.index_add_(2, c.columns, grad)


def _as_fp32_groups(q, k, v):
    """q (B, Hkv, G, Lq, E), k (B, Hkv, 1, Lkv, E), v (B, Hkv, 1, Lkv, Ev) in fp32 (views for fp32)."""
    B, Hq, Lq, E = q.shape
    Hkv = k.shape[1]
    f32 = [t.detach().to(torch.float32) for t in (q, k, v)]
    return f32[0].reshape(B, Hkv, Hq // Hkv, Lq, E), f32[1].unsqueeze(2), f32[2].unsqueeze(2)


class FusedAttention(torch.autograd.Function):
    """``apply(run, want_max, q, k, v, *captures) -> (out, lse, max_scores)``; saves q, k, v, out,
    lse; ``captures`` are the score_mod's tensors that require grad (inputs so gradients reach them)."""

    @staticmethod
    def forward(ctx, run: FusedRun, want_max: bool, q, k, v, *captures):
        out, lse, max_scores = fused_forward(run, q, k, v, want_max)
        ctx.run, ctx.captures = run, captures
        ctx.save_for_backward(q, k, v, out, lse, *captures)
        ctx.set_materialize_grads(False)
        if max_scores is None:
            return out, lse, None
        ctx.mark_non_differentiable(max_scores)
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, dout, dlse, _dmax):
        q, k, v, out, lse, *_ = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = fused_backward(ctx.run, q, k, v, out, lse, dout, dlse, ctx.captures)
        return None, None, *grads
