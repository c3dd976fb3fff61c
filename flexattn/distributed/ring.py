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

import torch

from flexattn.distributed.comm import RingComm
from flexattn.distributed.ring_run import RingRun, RingStats
from flexattn.distributed.shard_mask import ShardedMask
from flexattn.mod_eval import captured_grad_tensors


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
    ring = RingRun(
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


class _RingAttention(torch.autograd.Function):
    """Inputs: the ring, what to keep ("graphs" or "inputs"), q, k, v and the score_mod's learnable
    captured tensors."""

    @staticmethod
    def forward(ctx, ring: RingRun, keep: str, q, k, v, *captures):
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
