"""The passes of one ring call: which K/V shards arrive when (the ring or the direct schedule),
the attention calls of each step, the LSE merge, and the backward's gradient traffic.

``ring.py`` holds the public function and the autograd Function around a :class:`RingRun`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexattn.distributed.comm import RingComm
from flexattn.distributed.merge import LseAccumulator, partial_grads
from flexattn.distributed.shard_call import shard_call
from flexattn.distributed.shard_mask import ShardedMask


@dataclass
class RingStats:
    """What a ring call computed: ``calls`` lists (step, q segment, kv segment) of each forward
    attention call (a ``recompute`` backward repeats them)."""

    calls: list[tuple[int, int, int]] = field(default_factory=list)
    received: list[int] = field(default_factory=list)  # ranks whose K/V reached this one (forward)


@dataclass
class RingRun:
    """One ring call: its non-tensor parts, and the forward and backward passes over the steps."""

    mask: ShardedMask
    score_mod: Callable | None
    scale: float
    enable_gqa: bool
    kernel_options: dict | None
    comm: RingComm
    stats: RingStats | None
    schedule: str = "ring"

    def kv_shape(self, t: torch.Tensor, step: int) -> torch.Size:
        """Shape of the K (or V) shard held at ``step``: ``t``'s with the source rank's length."""
        shape = list(t.shape)
        shape[2] = self.mask.plan.local_len(self.mask.source(step))
        return torch.Size(shape)

    def forward(self, q, k, v, keep: str):
        """Run the ring. ``keep``: "nothing" (inference), "graphs" (each step's flex_attention graph for
        the backward) or "inputs" (only q, k, v: the backward recomputes). Returns out, lse, _Saved."""
        segments = self.mask.plan.segments[self.mask.rank]
        B, Hq, _, _ = q.shape
        merged = [LseAccumulator((B, Hq, s.length, v.shape[-1]), q) for s in segments]
        graphs = keep == "graphs"
        q_in = q.detach().requires_grad_(q.requires_grad) if keep != "nothing" else q
        steps = []
        for step, k_t, v_t in self._shards(k, v, tag=0):
            k_in, v_in, partials = self._step(
                step, q_in, k_t, v_t, graphs, k.requires_grad, v.requires_grad, record=True
            )
            for seg, out_i, lse_i in partials:
                merged[seg].add(out_i.detach(), lse_i.detach())
            if graphs:
                steps.append((step, k_in, v_in, partials))
            if step > 0 and self.stats is not None:
                self.stats.received.append(self.mask.source(step))
        out = torch.cat([m.out for m in merged], dim=2)
        lse = torch.cat([m.lse for m in merged], dim=2)
        saved = None
        if keep != "nothing":
            saved = _Saved(
                q_in,
                k.detach(),
                v.detach(),
                steps if graphs else None,
                [m.out for m in merged],
                [m.lse for m in merged],
            )
        return out.to(q.dtype), lse, saved

    def _shards(self, k, v, tag: int):
        """Yield (step, K, V of rank source(step)) for every step this schedule computes."""
        return self._circulate(k, v, tag) if self.schedule == "ring" else self._direct(k, v, tag)

    def _needs(self, rank: int, source: int) -> bool:
        """Whether rank ``rank``'s queries see any key of rank ``source``."""
        return rank == source or self.mask.plan.pair_work[rank][source] > 0

    def _direct(self, k, v, tag: int):
        """Own shard first; meanwhile every needed shard arrives straight from its owner."""
        rank, world = self.mask.rank, self.comm.world_size
        steps = [t for t in range(1, world) if self._needs(rank, self.mask.source(t))]
        sends = [(d, [k, v]) for d in range(world) if d != rank and self._needs(d, rank)]
        recvs = [(self.mask.source(t), [self.kv_shape(k, t), self.kv_shape(v, t)]) for t in steps]
        transfer = self.comm.exchange(sends, recvs, [k, v], tag=tag)
        yield 0, k, v
        received = transfer.wait()
        for i, step in enumerate(steps):
            yield step, received[2 * i], received[2 * i + 1]

    def _circulate(self, k, v, tag: int):
        """Yield (step, K, V held at that step); the next shard is in flight while the caller computes."""
        k_t, v_t = k, v
        world = self.comm.world_size
        for step in range(world):
            transfer = None
            if step + 1 < world:  # send on what we hold, receive the next shard
                shapes = [self.kv_shape(k, step + 1), self.kv_shape(v, step + 1)]
                transfer = self.comm.start([k_t, v_t], shapes, tag=tag)
            yield step, k_t, v_t
            if transfer is not None:
                k_t, v_t = transfer.wait()

    def _step(self, step, q_in, k_t, v_t, grad: bool, k_grad: bool, v_grad: bool, record: bool):
        """The calls of one ring step: (k leaf, v leaf, [(q segment, out_i, lse_i)]), with autograd
        graphs when ``grad``; ``record``: list them in the stats (forward calls only)."""
        if grad:
            k_t, v_t = k_t.detach().requires_grad_(k_grad), v_t.detach().requires_grad_(v_grad)
        partials = []
        for pair in self.mask.steps[step]:
            if pair.call is None:
                continue  # no block of the pair is visited: skipped
            (qa, qb), (ka, kb) = pair.q_rows, pair.kv_rows
            with torch.enable_grad() if grad else torch.no_grad():
                out_i, lse_i = shard_call(
                    q_in[:, :, qa:qb],
                    k_t[:, :, ka:kb],
                    v_t[:, :, ka:kb],
                    self.score_mod,
                    pair.call,
                    self.scale,
                    self.enable_gqa,
                    self.kernel_options,
                )
            if record and self.stats is not None:
                self.stats.calls.append((step, pair.q_segment, pair.kv_segment))
            partials.append((pair.q_segment, out_i, lse_i))
        return k_t, v_t, partials

    def backward(self, saved: _Saved, d_out, d_lse, wants, captures):
        """dq, dk, dv, d_captures (None where not wanted) from the merged result's gradients."""
        k, v = saved.k, saved.v
        rows = _segment_rows(self.mask.plan.segments[self.mask.rank])
        acc_dtype = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
        dq = torch.zeros_like(saved.q, dtype=acc_dtype) if wants[0] else None
        d_caps = [_zeros_fp32(c) if need else None for c, need in zip(captures, wants[3:])]
        if saved.steps is not None:
            steps = iter(saved.steps)
        else:  # recompute: the K/V travel again (tags 0-1; the accumulators use 2-3)
            steps = (
                (step, *self._step(step, saved.q, k_t, v_t, True, wants[1], wants[2], record=False))
                for step, k_t, v_t in self._shards(k, v, tag=0)
            )
        world = self.comm.world_size
        if self.schedule == "direct":
            return self._backward_direct(
                saved, steps, rows, d_out, d_lse, wants, captures, dq, d_caps, acc_dtype
            )
        acc, transfer = None, None
        for step, k_in, v_in, partials in steps:
            g_q, g_k, g_v, g_caps = self._step_grads(
                saved, partials, rows, d_out, d_lse, k_in, v_in, wants, captures
            )
            if g_q is not None:
                dq += g_q
            for total, g in zip(d_caps, g_caps):
                if g is not None:
                    total += g
            if step == 0:
                acc = [torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (k_in, v_in)]
            else:
                acc = transfer.wait()
            for a, g in zip(acc, (g_k, g_v)):
                if g is not None:
                    a += g
            if world > 1:  # the accumulator follows its shard to the next rank; the last hop takes it home
                nxt = (step + 1) % world
                transfer = self.comm.start(acc, [self.kv_shape(k, nxt), self.kv_shape(v, nxt)], tag=2)
        dk, dv = transfer.wait() if world > 1 else acc
        return (
            None if dq is None else dq.to(saved.q.dtype),
            dk.to(k.dtype) if wants[1] else None,
            dv.to(v.dtype) if wants[2] else None,
            [None if g is None else g.to(c.dtype) for g, c in zip(d_caps, captures)],
        )

    def _backward_direct(self, saved, steps, rows, d_out, d_lse, wants, captures, dq, d_caps, acc_dtype):
        """Direct schedule: each visiting shard's dK/dV go straight back to its owner, summed there."""
        k, v = saved.k, saved.v
        rank, world = self.mask.rank, self.comm.world_size
        own, outgoing = None, []
        for step, k_in, v_in, partials in steps:
            g_q, g_k, g_v, g_caps = self._step_grads(
                saved, partials, rows, d_out, d_lse, k_in, v_in, wants, captures
            )
            if g_q is not None:
                dq += g_q
            for total, g in zip(d_caps, g_caps):
                if g is not None:
                    total += g
            grads = [
                torch.zeros(t.shape, dtype=acc_dtype, device=t.device) if g is None else g.to(acc_dtype)
                for t, g in ((k_in, g_k), (v_in, g_v))
            ]
            if step == 0:
                own = grads
            else:
                outgoing.append((self.mask.source(step), grads))
        senders = [d for d in range(world) if d != rank and self._needs(d, rank)]
        shapes = [own[0].shape, own[1].shape]
        transfer = self.comm.exchange(outgoing, [(d, shapes) for d in senders], own, tag=2)
        received = transfer.wait()
        dk, dv = own
        for i in range(len(senders)):
            dk += received[2 * i]
            dv += received[2 * i + 1]
        return (
            None if dq is None else dq.to(saved.q.dtype),
            dk.to(k.dtype) if wants[1] else None,
            dv.to(v.dtype) if wants[2] else None,
            [None if g is None else g.to(c.dtype) for g, c in zip(d_caps, captures)],
        )

    def _step_grads(self, saved, partials, rows, d_out, d_lse, k_in, v_in, wants, captures):
        """Gradients of one step's calls w.r.t. (q, visiting k, visiting v, captures)."""
        leaves = [saved.q, k_in, v_in, *captures]
        wrt = [t for t, need in zip(leaves, wants) if need]
        outputs, upstream = [], []
        for seg, out_i, lse_i in partials:
            a, b = rows[seg]
            g_out, g_lse = partial_grads(
                out_i, lse_i, saved.out[seg], saved.lse[seg], d_out[:, :, a:b], d_lse[:, :, a:b]
            )
            for t, g in ((out_i, g_out), (lse_i, g_lse)):
                if t.requires_grad:
                    outputs.append(t)
                    upstream.append(g)
        got = iter(
            torch.autograd.grad(outputs, wrt, upstream, allow_unused=True) if outputs else [None] * len(wrt)
        )
        grads = [next(got) if need else None for need in wants]
        return grads[0], grads[1], grads[2], grads[3:]


@dataclass
class _Saved:
    q: torch.Tensor  # the local query leaf of the steps' graphs
    k: torch.Tensor  # this rank's K and V (detached)
    v: torch.Tensor
    steps: list | None  # per step (step, k leaf, v leaf, [(q segment, out_i, lse_i)]); None: recompute
    out: list[torch.Tensor]  # merged out per q segment (fp32 / fp64)
    lse: list[torch.Tensor]  # merged lse per q segment


def _zeros_fp32(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _segment_rows(segments) -> list[tuple[int, int]]:
    rows, offset = [], 0
    for s in segments:
        rows.append((offset, offset + s.length))
        offset += s.length
    return rows
