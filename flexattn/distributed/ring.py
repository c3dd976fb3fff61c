"""Ring attention: attention over a sequence sharded across the ranks of a process group.

Rank r holds the queries, keys and values of its plan segments. In N = world_size steps the K/V
shards travel around the ring (step t holds rank (r - t)'s, received while step t - 1 computes);
each step computes this rank's query segments against the visiting key segments with
``flex_attention(..., return_lse=True)`` (mods at global positions, the global mask sliced), skipping
pairs the mask never visits, and the partials merge exactly through their LSE.

Backward (one ``torch.autograd.Function``, so every rank runs the same communication whatever it
skipped): the gradients of each step's partials follow from those of the merged result
(``merge.partial_grads``); ``torch.autograd.grad`` through the step's flex_attention calls gives dq,
the captured-tensor gradients and the visiting shard's dK/dV, which are added to a dK/dV accumulator
that travels the ring behind the K/V (received while the step computes) and arrives home after N hops.

``schedule="direct"`` replaces the rotation by one exchange: each rank sends its K/V only to the
ranks whose queries see them (``plan.pair_work``), computes its own shard while they travel, then the
rest; in the backward each visiting shard's dK/dV go straight back to its owner.

Memory for the backward (besides the merged out and lse, fp32, of the local rows):
- default: each computed pair's flex_attention graph — the visiting K/V (over the steps, every
  rank's: the whole sequence's K/V on each rank) and the partial out / lse;
- ``recompute=True``: only the local q, k, v; the backward sends the K/V around the ring again
  (tags 0-1, overlapped with compute like the forward) and recomputes each step's forward before its
  gradients — one more forward and one more K/V rotation, memory O(local shard).
Inference (nothing requires grad) keeps nothing and holds at most two K/V shards at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexattn.distributed.comm import RingComm
from flexattn.distributed.merge import LseAccumulator, partial_grads
from flexattn.distributed.shard_call import shard_call
from flexattn.distributed.shard_mask import ShardedMask
from flexattn.mod_eval import captured_grad_tensors


@dataclass
class RingStats:
    """What a ring call computed: ``calls`` lists (step, q segment, kv segment) of each forward
    attention call (a ``recompute`` backward repeats them)."""

    calls: list[tuple[int, int, int]] = field(default_factory=list)
    received: list[int] = field(default_factory=list)  # ranks whose K/V reached this one (forward)


def ring_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sharded_mask: ShardedMask,
    score_mod: Callable | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    group=None,
    recompute: bool = False,
    schedule: str = "ring",
    stats: RingStats | None = None,
):
    """``flex_attention`` over the sequence sharded by ``sharded_mask.plan``, exact.

    Args:
        query (B, Hq, L_r, E), key (B, Hkv, L_r, E), value (B, Hkv, L_r, Ev): this rank's rows
            (``shard_sequence`` of the global tensors, L_r = plan.local_len(rank)).
        sharded_mask: ``shard_block_mask(global_mask, plan, rank)`` for this rank of ``group``.
        score_mod, scale, enable_gqa, kernel_options: as in ``flex_attention``; the mods see global
            positions. Learnable tensors captured by score_mod get their (summed) local gradient:
            all-reduce them across ranks like any parameter gradient.
        return_lse: also return lse (B, Hq, L_r).
        group: the process group (None: the default one); its size must be the plan's world size.
        recompute: keep only q, k, v for the backward, which sends the K/V around the ring again and
            recomputes each step's forward (memory O(local shard) instead of every visiting K/V
            shard and partial result; costs one more forward and one more K/V rotation).
        schedule: "ring": K/V shards travel rank to rank, one step at a time (every shard passes every
            rank; each step waits for its slowest rank). "direct": each rank sends its K/V straight to
            the ranks whose queries see it (``plan.pair_work``) and to no other, computes its own
            shard while they travel, then the rest; dK/dV go straight back to their owners. No step
            waits for another rank's compute and unneeded shards are never sent, but a rank receives
            all the shards it needs at once (held until the end of the forward).
        stats: a ``RingStats`` to record the calls in (tests, debugging).
    Returns:
        out (B, Hq, L_r, Ev) in query's dtype, and lse (fp32, fp64 for fp64 inputs) with ``return_lse``.
    """
    comm = RingComm(group)
    _check(query, key, value, sharded_mask, comm, schedule)
    ring = _Ring(
        sharded_mask,
        score_mod,
        1.0 / math.sqrt(query.shape[-1]) if scale is None else scale,
        enable_gqa,
        kernel_options,
        comm,
        stats,
        schedule,
    )
    captures = captured_grad_tensors(score_mod) if score_mod is not None else []
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *captures))
    if wants_grad:
        keep = "inputs" if recompute else "graphs"
        out, lse = _RingAttention.apply(ring, keep, query, key, value, *captures)
    else:
        with torch.no_grad():
            out, lse, _ = ring.forward(query, key, value, "nothing")
    return (out, lse) if return_lse else out


@dataclass
class _Ring:
    """The non-tensor parts of one ring call."""

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


class _RingAttention(torch.autograd.Function):
    """Inputs: the ring, what to keep ("graphs" or "inputs"), q, k, v and the score_mod's learnable
    captured tensors."""

    @staticmethod
    def forward(ctx, ring: _Ring, keep: str, q, k, v, *captures):
        out, lse, saved = ring.forward(q, k, v, keep)
        ctx.ring, ctx.saved, ctx.captures = ring, saved, captures
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        wants = ctx.needs_input_grad[2:]
        dq, dk, dv, d_caps = ctx.ring.backward(ctx.saved, d_out, d_lse, wants, ctx.captures)
        ctx.saved = None
        return (None, None, dq, dk, dv, *d_caps)


def _check(query, key, value, sharded_mask: ShardedMask, comm: RingComm, schedule: str) -> None:
    if not isinstance(sharded_mask, ShardedMask):
        raise TypeError(
            "sharded_mask must be a ShardedMask from shard_block_mask(block_mask, plan, rank), "
            f"got {type(sharded_mask).__name__}"
        )
    plan = sharded_mask.plan
    if schedule not in ("ring", "direct"):
        raise ValueError(f"schedule must be 'ring' or 'direct', got {schedule!r}")
    if schedule == "direct" and plan.pair_work is None:
        raise ValueError("schedule='direct' needs the plan's pair_work: make the plan with plan_shards")
    if comm.world_size != plan.world_size or comm.rank != sharded_mask.rank:
        raise ValueError(
            f"sharded_mask is for rank {sharded_mask.rank} of {plan.world_size}, but this process is rank "
            f"{comm.rank} of {comm.world_size} in the group: build it with shard_block_mask(mask, plan, "
            f"{comm.rank}) from a plan for {comm.world_size} ranks"
        )
    local = plan.local_len(sharded_mask.rank)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4 or t.shape[2] != local:
            raise ValueError(
                f"{name} must be this rank's shard (B, H, {local}, E) (plan.local_len({sharded_mask.rank})), "
                f"got shape {tuple(t.shape)}: pass shard_sequence(x, plan, rank, dim=2)"
            )
