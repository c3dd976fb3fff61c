"""The CPU engine for any score_mod: chunked matmul + mod + softmax in fp32, LSE-only backward.

For mods SDPA's mask argument cannot carry (soft-capping's ``tanh``, anything that is not
``score + f``), for learnable captured tensors (SDPA's backward gives no score gradient) and for
``max_scores``. Per chunk of query rows (``flexattn.cpu.chunks``, one query block per chunk where
a mask is needed, so little of a diagonal block's empty half is computed), over its visited keys
only, ordered [the kv blocks FULL for every row and (b, h), the others] so that the mask is applied
in place to the trailing columns only::

    s = (q * scale) @ k^T; s = score_mod(s, ...) (vmap); s = -inf where not allowed   # fp32
    m = max(s); p = exp(s - m) (in place); [o | l] = p @ [v | 1]; out = o / l; lse = m + log(l)

The forward saves only out and lse. The backward recomputes ``s`` per chunk, ``p = exp(s - lse)``
(masked), ``dS = p * ([dout | -delta] @ [v | 1]^T)`` with ``delta = rowsum(dout * out) - dlse``,
and pulls dS through the score_mod with autograd (to the raw score and the learnable captures),
then ``dq = dS_raw @ k * scale``, ``dk += dS_raw^T @ q * scale``, ``dv += p^T @ dout``.
Inputs are converted to fp32 once per call. Rows with no allowed key: out 0, lse -inf, zero grads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexattn.cpu.chunk_masks import ChunkMasks
from flexattn.cpu.chunks import Chunk, split_full
from flexattn.cpu.mod_graph import GridScratch, ModGraph, ModValues
from flexattn.mod_eval import broadcast_grids, eval_score_mod, index

# Score elements (B * Hq * rows * cols) per step of a chunk: rows are cut to fit. Large, so that a
# step is a whole 128-row chunk up to 8k keys at B * Hq = 8: every step adds its dk / dv into the
# (cols, E) accumulators, which for few rows costs more than the step's scores (8k softcap fwd+bwd
# 1 << 21: -25%).
STEP_ELEMENTS = 1 << 23


@dataclass
class ChunkKeys:
    """One chunk's keys in the engine's order: ``k`` (B, Hkv, 1, cols, E), ``v1`` (B, Hkv, 1, cols,
    Ev + 1) (v and a ones column: the matmul also sums p), ``kv_idx`` int32 (cols,), ``parts`` (the
    chunks whose columns are concatenated) and ``hidden``: bool (Bm, Hm, rows, cols - offset) where
    the last ``cols - offset`` columns are masked out, or None."""

    k: torch.Tensor
    v1: torch.Tensor
    kv_idx: torch.Tensor
    parts: list[Chunk]
    offset: int
    hidden: torch.Tensor | None


class FusedRun:
    """One call's chunks, masks, score_mod and scale."""

    def __init__(self, chunks: list[Chunk], masks: ChunkMasks, score_mod: Callable | None, scale: float,
                 kv_len: int, graph: ModGraph | None = None):  # fmt: skip
        self.chunks, self.masks, self.score_mod, self.scale = chunks, masks, score_mod, scale
        self.kv_len, self.graph = kv_len, graph
        # the graph's score input is this times the raw score: folded into q's scaling (q5)
        self.score_factor = 1.0 if graph is None else graph.score_factor
        self.scratch: GridScratch | None = None  # the mod graph's grids, during one pass only

    def steps(self, B: int, Hq: int):
        """``(chunk, rows)`` pieces: each chunk cut into row ranges of about STEP_ELEMENTS scores."""
        for c in self.chunks:
            per_row = max(1, B * Hq * c.cols)
            rows = max(1, STEP_ELEMENTS // per_row)
            for start in range(c.start, c.stop, rows):
                yield c, slice(start, min(start + rows, c.stop))

    def step_numel(self, B: int, Hq: int) -> int:
        """The most score elements of one step's (B, Hq, rows, cols) grid."""
        return max((B * Hq * min(c.rows, max(1, STEP_ELEMENTS // max(1, B * Hq * c.cols))) * c.cols
                    for c in self.chunks), default=0)  # fmt: skip

    def workspace(self, B: int, Hq: int) -> torch.Tensor:
        """fp32 scratch for one step's (B, Hq, rows, cols) grid (fresh grids of this size cost
        page faults on every step)."""
        return torch.empty(self.step_numel(B, Hq), dtype=torch.float32, device="cpu")

    def begin_pass(self, B: int, Hq: int) -> None:
        """Before the forward's or the backward's steps: the mod graph's scratch grids."""
        self.scratch = GridScratch(self.step_numel(B, Hq)) if self.graph is not None else None

    def end_pass(self) -> None:
        self.scratch = None  # (not held from the forward to the backward: a model has many layers)

    def keys(self, c: Chunk, k5, v15) -> ChunkKeys:
        """The chunk's keys, values (``v15``: [v | 1], (B, Hkv, 1, Lkv, Ev + 1)) and mask."""
        parts = split_full(c, self.masks.kv_block, self.kv_len)
        if _in_order(parts):  # the full blocks come first anyway (causal): views, no copies
            parts = [c] if parts[-1].classes is None else parts
            cols = slice(parts[0].columns.start, parts[-1].columns.stop)
            k, v1, kv_idx = k5[:, :, :, cols], v15[:, :, :, cols], c.kv_positions("cpu")
        else:
            k = torch.cat([p.take(k5.squeeze(2)) for p in parts], dim=2).unsqueeze(2)
            v1 = torch.cat([p.take(v15.squeeze(2)) for p in parts], dim=2).unsqueeze(2)
            kv_idx = torch.cat([p.kv_positions("cpu") for p in parts])
        last = parts[-1]
        hidden, offset = None, c.cols
        if last.classes is not None:
            hidden, offset = self.masks.mask(last).isneginf(), c.cols - last.cols
        return ChunkKeys(k, v1, kv_idx, parts, offset, hidden)

    def scores(self, q5, keys: ChunkKeys, c: Chunk, rows: slice, grad: bool = False, out=None):
        """``(raw, modded, values)`` fp32 (B, Hq, r, cols) scores of query rows ``rows`` of chunk
        ``c`` (``q5`` already scaled), unmasked. With the mod's graph (``self.graph``) ``modded`` is
        the caller's to overwrite, ``raw`` may be gone, and ``values`` gives the derivative if
        ``grad`` (``ModValues.dscore``); else ``values`` is None, ``modded`` is contiguous and
        differentiable in ``raw`` and the captures if ``grad`` (it may be ``raw`` itself).
        ``out``: a workspace for ``raw`` (not with autograd)."""
        B, Hkv, G, _, _ = q5.shape
        r = rows.stop - rows.start
        raw = _grouped_matmul(q5[:, :, :, rows], keys.k.transpose(-1, -2), out).view(B, Hkv * G, r, -1)
        if self.score_mod is None:
            return raw, raw, None
        q_idx = index(rows.start, rows.stop, raw.device)
        if self.graph is not None:
            values = ModValues(self.graph, keep_for_backward=grad, scratch=self.scratch)
            grids = broadcast_grids(index(0, B, raw.device), index(0, Hkv * G, raw.device), q_idx, keys.kv_idx)
            s = values.modded(raw, *grids)
            return raw, s, values
        if grad:
            raw.requires_grad_()
        s = eval_score_mod(self.score_mod, raw, q_idx, keys.kv_idx).to(torch.float32)
        if not s.is_contiguous():
            s = s.contiguous()
        return raw, s, None

    def hide(self, t: torch.Tensor, keys: ChunkKeys, c: Chunk, rows: slice, value: float) -> None:
        """``t`` (B, Hq, r, cols) := ``value`` in place where the chunk's mask hides the pair."""
        if keys.hidden is not None:
            hidden = keys.hidden[:, :, rows.start - c.start : rows.stop - c.start]
            t[..., keys.offset :].masked_fill_(hidden, value)


def fused_forward(run: FusedRun, q, k, v, want_max: bool):
    """``(out (B, Hq, Lq, Ev) q's dtype, lse (B, Hq, Lq) fp32, max_scores or None)``."""
    B, Hq, Lq, _ = q.shape
    Hkv, Ev = k.shape[1], v.shape[-1]
    q5, k5, v5 = _as_fp32_groups(q, k, v, run.scale * run.score_factor)
    v15 = _with_ones(v5)
    out = torch.zeros(B, Hkv, Hq // Hkv, Lq, Ev, dtype=torch.float32, device="cpu")
    lse = torch.full((B, Hq, Lq), -math.inf, device="cpu")
    max_scores = torch.full((B, Hq, Lq), -math.inf, device="cpu") if want_max else None
    keys, current, work = None, None, run.workspace(B, Hq)
    run.begin_pass(B, Hq)
    for c, rows in run.steps(B, Hq):
        if c.cols == 0:
            continue
        if c is not current:
            keys, current = run.keys(c, k5, v15), c
        with torch.no_grad():
            _, s, _ = run.scores(q5, keys, c, rows, out=work)
        run.hide(s, keys, c, rows, -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        if want_max:
            max_scores[:, :, rows] = m.squeeze(-1)
        m = m.masked_fill_(torch.isneginf(m), 0.0)
        p = s.sub_(m).exp_()
        o = p.view(B, Hkv, Hq // Hkv, *p.shape[2:]) @ keys.v1  # (B, Hkv, G, r, Ev + 1)
        denom = o[..., -1:]
        out[:, :, :, rows] = o[..., :-1] / denom.masked_fill(denom == 0, 1.0)
        lse[:, :, rows] = (m + denom.reshape(m.shape).log()).squeeze(-1)
    run.end_pass()
    return out.view(B, Hq, Lq, Ev).to(q.dtype), lse, max_scores


def fused_backward(run: FusedRun, q, k, v, out, lse, dout, dlse, captures):
    """``(dq, dk, dv, *dcaptures)``: q, k, v's dtypes; capture gradients None where unused."""
    B, Hq, Lq, E = q.shape
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    q5, k5, v5 = _as_fp32_groups(q, k, v, run.scale * run.score_factor)
    do5 = dout.to(torch.float32).view(B, Hkv, G, Lq, -1)
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1)  # (B, Hq, Lq)
    if dlse is not None:
        delta = delta - dlse
    do1 = torch.cat([do5, -delta.view(B, Hkv, G, Lq, 1)], dim=-1)  # [dout | -delta] @ [v | 1]^T
    lse_safe = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows with no key: every score is -inf
    v15 = _with_ones(v5)
    dq = torch.zeros_like(q5)
    dk, dv = torch.zeros_like(k5), torch.zeros_like(v5)
    dcaps = [None] * len(captures)
    keys, current = None, None
    need_mod_grad = run.score_mod is not None
    work, work_dp = run.workspace(B, Hq), run.workspace(B, Hq)
    run.begin_pass(B, Hq)
    for c, rows in run.steps(B, Hq):
        if c.cols == 0:
            continue
        if c is not current:
            keys, current = run.keys(c, k5, v15), c
        autograd = need_mod_grad and run.graph is None
        with torch.enable_grad() if autograd else torch.no_grad():
            raw, s, values = run.scores(q5, keys, c, rows, need_mod_grad, None if autograd else work)
        r = rows.stop - rows.start
        row_lse = lse_safe[:, :, rows, None]
        p = s.sub_(row_lse) if values is not None else s.detach() - row_lse  # (the graph's s is ours)
        run.hide(p, keys, c, rows, -math.inf)
        p = p.exp_()  # (B, Hq, r, cols)
        p5 = p.view(B, Hkv, G, r, -1)
        dv_c = (p5.transpose(-1, -2) @ do5[:, :, :, rows]).sum(2)  # (B, Hkv, cols, Ev)
        dp = _grouped_matmul(do1[:, :, :, rows], keys.v1.transpose(-1, -2), work_dp)
        ds = p.mul_(dp.view(B, Hq, r, -1))
        if values is not None:  # the compiler's derivative graph, in place
            ds = values.dscore(ds)
            run.hide(ds, keys, c, rows, 0.0)  # a mod's derivative may be inf / nan where hidden
        elif autograd and not s.requires_grad:  # the mod ignores the score and the captures
            ds = torch.zeros_like(ds)
        elif autograd:
            wrt = [raw, *captures]
            grads = torch.autograd.grad(s, wrt, ds, allow_unused=True)
            ds = grads[0] if grads[0] is not None else torch.zeros_like(raw)
            run.hide(ds, keys, c, rows, 0.0)
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    dcaps[i] = g if dcaps[i] is None else dcaps[i] + g
        ds5 = ds.view(B, Hkv, G, r, -1)
        dq[:, :, :, rows] = (ds5 @ keys.k) * run.scale
        dk_c = (ds5.transpose(-1, -2) @ q5[:, :, :, rows]).sum(2)  # q5 holds q * scale * factor
        if run.score_factor != 1.0:
            dk_c.div_(run.score_factor)
        _add_columns(dk, keys, dk_c)
        _add_columns(dv, keys, dv_c)
    run.end_pass()
    dq = dq.view(B, Hq, Lq, E).to(q.dtype)
    return (dq, dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype), *dcaps)


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a (B, Hkv, G, r, K) @ b (B, Hkv, 1, K, N) -> (B, Hkv, G, r, N), one bmm, into ``out``'s
    storage (a flat workspace) if given."""
    B, Hkv, G, r, K = a.shape
    N = b.shape[-1]
    a3 = a.reshape(B * Hkv, G * r, K)  # (a copy of the rows for GQA: small)
    b3 = b.reshape(B * Hkv, K, N)
    if out is None:
        return torch.bmm(a3, b3).view(B, Hkv, G, r, N)
    return torch.bmm(a3, b3, out=out[: B * Hkv * G * r * N].view(B * Hkv, G * r, N)).view(B, Hkv, G, r, N)


def _in_order(parts: list[Chunk]) -> bool:
    """The parts' columns are slices that follow each other (their concatenation is one slice)."""
    if not all(isinstance(p.columns, slice) for p in parts):
        return False
    return all(a.columns.stop == b.columns.start for a, b in zip(parts, parts[1:]))


def _add_columns(acc5: torch.Tensor, keys: ChunkKeys, grad: torch.Tensor) -> None:
    """acc5 (B, Hkv, 1, Lkv, D) += grad (B, Hkv, cols, D) at the chunk's key positions."""
    acc, start = acc5.squeeze(2), 0
    for part in keys.parts:
        g = grad[:, :, start : start + part.cols]
        start += part.cols
        if isinstance(part.columns, slice):
            acc[:, :, part.columns] += g
        else:
            acc.index_add_(2, part.columns, g)


def _with_ones(v5: torch.Tensor) -> torch.Tensor:
    """[v | 1]: (..., Ev + 1), so that ``p @ [v | 1]`` also gives the row sums of p."""
    return torch.cat([v5, v5.new_ones(*v5.shape[:-1], 1)], dim=-1)


def _as_fp32_groups(q, k, v, scale: float):
    """q * scale (B, Hkv, G, Lq, E), k (B, Hkv, 1, Lkv, E), v (B, Hkv, 1, Lkv, Ev) in fp32 (k and v
    views for fp32)."""
    B, Hq, Lq, E = q.shape
    Hkv = k.shape[1]
    qs = q.detach().to(torch.float32) * scale
    k32, v32 = (t.detach().to(torch.float32) for t in (k, v))
    return qs.reshape(B, Hkv, Hq // Hkv, Lq, E), k32.unsqueeze(2), v32.unsqueeze(2)


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
