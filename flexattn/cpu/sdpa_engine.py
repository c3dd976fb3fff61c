"""The CPU engine for masks and additive score mods: PyTorch's fused CPU flash kernel, chunk by chunk.

Per chunk (``flexattn.cpu.chunks``) of query rows: the visited keys only, and the chunk's float
attn_mask (``bias`` where allowed, -inf elsewhere; none when every visited block is full and there
is no bias; a chunk with both full and other blocks is two calls, merged by their LSE) into
``aten._scaled_dot_product_flash_attention_for_cpu`` (fused, multithreaded, fp32 softmax;
returns out and the natural-log LSE). The backward calls its backward op per chunk with the mask
rebuilt, so memory stays one chunk's mask, never B*H*Lq*Lkv.

Semantics kept exactly: a row with no allowed key gets out 0 and lse -inf, and zero gradients (its
LSE is given to the backward op as 0, where every score is -inf). ``dlse`` (a loss that uses the
LSE) enters through one extra head-dimension column: with ``q, k, v`` padded by a zero column,
``out`` by ``-dlse`` and ``dout`` by 1, the op's ``delta = rowsum(dout * out)`` becomes
``delta - dlse`` and nothing else changes. Head dims E != Ev are padded with zeros to the larger.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexattn.cpu.chunk_masks import ChunkMasks
from flexattn.cpu.chunks import Chunk, split_full

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class SdpaRun:
    """One call's chunks, masks and scale (what the autograd Function needs besides tensors)."""

    def __init__(self, chunks: list[Chunk], masks: ChunkMasks, scale: float, kv_len: int):
        self.chunks, self.masks, self.scale, self.kv_len = chunks, masks, scale, kv_len

    def parts(self, chunk: Chunk) -> list[Chunk]:
        """The chunk's SDPA calls: its all-FULL kv blocks unmasked, the rest masked (``split_full``)."""
        return split_full(chunk, self.masks.kv_block, self.kv_len)


def sdpa_forward(run: SdpaRun, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) fp32)``; q, k, v as flex_attention's."""
    B, Hq, Lq, _ = q.shape
    Ev = v.shape[-1]
    qp, kp, vp = _pad_heads(q, k, v)
    out = q.new_empty(B, Hq, Lq, Ev)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device="cpu")
    for c in run.chunks:
        rows = slice(c.start, c.stop)
        if c.cols == 0:  # no key visited: fully masked rows
            out[:, :, rows] = 0
            lse[:, :, rows] = -math.inf
            continue
        parts = [_part(run, p, qp[:, :, rows], kp, vp, q.dtype) for p in run.parts(c)]
        o, l = parts[0] if len(parts) == 1 else _merge(parts)
        if (c.start, c.stop) == (0, Lq):  # one chunk of every row: its result as it comes (no copy
            return o[..., :Ev].to(q.dtype), l  # into out and lse; the op's lse is (B, Lq, Hq) in memory)
        out[:, :, rows] = o[..., :Ev]
        lse[:, :, rows] = l
    return out, lse


def _part(run: SdpaRun, c: Chunk, q_rows, kp, vp, dtype):
    """One SDPA call: the chunk's rows against its keys ``c``; rows with no allowed key: 0, -inf."""
    mask, empty = run.masks.float_mask(c, dtype)
    o, l = _FORWARD(q_rows, c.take(kp), c.take(vp), attn_mask=mask, scale=run.scale)
    if empty is not None:
        o = o.masked_fill(empty.unsqueeze(-1), 0)
        l = l.masked_fill(empty, -math.inf)
    return o, l


def _merge(parts):
    """Softmax over the union of the parts' keys from each part's (out, lse)."""
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
    safe = lse.masked_fill(torch.isneginf(lse), 0.0)
    out = sum(o.to(torch.float32) * (l - safe).exp().unsqueeze(-1) for o, l in parts)
    return out, lse


def sdpa_backward(run: SdpaRun, q, k, v, out, lse, dout, dlse):
    """``(dq, dk, dv)`` laid out like q, k, v. ``dlse`` may be None. Each part's backward takes the
    merged out and lse, so its ``exp(s - lse)`` is the softmax over all of the row's keys."""
    Ev = v.shape[-1]
    use_lse = dlse is not None
    qp, kp, vp = _pad_heads(q, k, v, extra=int(use_lse))
    dq = torch.zeros(qp.shape, dtype=torch.float32, device="cpu")
    dk = torch.zeros(kp.shape, dtype=torch.float32, device="cpu")
    dv = torch.zeros(vp.shape, dtype=torch.float32, device="cpu")
    width = vp.shape[-1]
    out_p = F.pad(out, (0, width - Ev))
    dout_p = F.pad(dout.to(q.dtype), (0, width - Ev))
    if use_lse:  # the last column: out' = -dlse, dout' = 1 (module docstring)
        out_p[..., -1] = -dlse.to(q.dtype)
        dout_p[..., -1] = 1
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows with no key: every score is -inf there
    for c in run.chunks:
        if c.cols == 0:
            continue
        rows = slice(c.start, c.stop)
        for part in run.parts(c):
            mask, _ = run.masks.float_mask(part, q.dtype, want_empty=False)
            dq_c, dk_c, dv_c = _BACKWARD(
                dout_p[:, :, rows], qp[:, :, rows], part.take(kp), part.take(vp), out_p[:, :, rows],
                lse[:, :, rows].contiguous(), 0.0, False, attn_mask=mask, scale=run.scale,
            )  # fmt: skip
            dq[:, :, rows] += dq_c
            _add_columns(dk, part, dk_c)
            _add_columns(dv, part, dv_c)
    E = q.shape[-1]
    return dq[..., :E].to(q.dtype), dk[..., :E].to(k.dtype), dv[..., :Ev].to(v.dtype)


def _add_columns(acc: torch.Tensor, c: Chunk, grad: torch.Tensor) -> None:
    if isinstance(c.columns, slice):
        acc[:, :, c.columns] += grad
    else:
        acc.index_add_(2, c.columns, grad.to(acc.dtype))


def _pad_heads(q, k, v, extra: int = 0):
    """q, k, v with zero columns appended so that all three share one head dim (+ ``extra``)."""
    width = max(q.shape[-1], v.shape[-1]) + extra
    return tuple(t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))


class SdpaAttention(torch.autograd.Function):
    """``apply(run, q, k, v) -> (out, lse)``; saves q, k, v, out and lse (the LSE is what the
    backward op needs), recomputes the masks."""

    @staticmethod
    def forward(ctx, run: SdpaRun, q, k, v):
        out, lse = sdpa_forward(run, q, k, v)
        ctx.run = run
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = sdpa_backward(ctx.run, q, k, v, out, lse, dout, dlse)
        return None, dq, dk, dv
