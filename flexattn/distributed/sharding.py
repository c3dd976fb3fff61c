"""Moving tensors between the global sequence and the ranks' shards of a :class:`ShardPlan`.

A rank's local tensor holds its plan segments one after another along the sequence dimension::

    >>> import torch
    >>> from flexattn.distributed.plan import Segment, ShardPlan
    >>> plan = ShardPlan(8, 2, "zigzag", ((Segment(0, 2), Segment(6, 8)), (Segment(2, 6),)), (1, 1))
    >>> x = torch.arange(8)
    >>> shard_sequence(x, plan, 0, dim=0).tolist()
    [0, 1, 6, 7]
    >>> unshard_sequence([shard_sequence(x, plan, r, dim=0) for r in range(2)], plan, dim=0).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flexattn.distributed.plan import ShardPlan


def shard_sequence(x: torch.Tensor, plan: ShardPlan, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s part of ``x``: its segments of dimension ``dim`` (length plan.seq_len), concatenated.

    E.g. q (B, H, L, E) -> (B, H, plan.local_len(rank), E) with ``dim=2``; token ids (B, L) with ``dim=1``.
    """
    _check_rank(plan, rank)
    if x.shape[dim] != plan.seq_len:
        raise ValueError(
            f"x has {x.shape[dim]} positions along dim {dim}, the plan {plan.seq_len}: pass the global "
            "tensor and the dimension that holds the sequence"
        )
    return torch.cat([x.narrow(dim, s.start, s.length) for s in plan.segments[rank]], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], plan: ShardPlan, dim: int = 2) -> torch.Tensor:
    """The global tensor from every rank's shard (``shards[r]`` from rank r), the inverse of
    :func:`shard_sequence`."""
    if len(shards) != plan.world_size:
        raise ValueError(f"shards must hold one tensor per rank ({plan.world_size}), got {len(shards)}")
    pieces = []
    for rank, shard in enumerate(shards):
        if shard.shape[dim] != plan.local_len(rank):
            raise ValueError(
                f"shards[{rank}] has {shard.shape[dim]} positions along dim {dim}, the plan gives rank "
                f"{rank} {plan.local_len(rank)}"
            )
        offset = 0
        for s in plan.segments[rank]:
            pieces.append((s.start, shard.narrow(dim, offset, s.length)))
            offset += s.length
    return torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])], dim=dim)


def global_positions(plan: ShardPlan, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 (plan.local_len(rank),): the global position of each local row of rank ``rank``."""
    _check_rank(plan, rank)
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in plan.segments[rank]])


def gather_sequence(x: torch.Tensor, plan: ShardPlan, group=None, dim: int = 2) -> torch.Tensor:
    """The global tensor on every rank from each rank's local ``x`` (an all-gather; not differentiable).

    Shards of unequal length are padded to the longest for the collective and cropped after.
    """
    world = dist.get_world_size(group)
    if world != plan.world_size:
        raise ValueError(f"the process group has {world} ranks, the plan {plan.world_size}")
    longest = max(plan.local_len(r) for r in range(world))
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    shards = [g.narrow(dim, 0, plan.local_len(r)) for r, g in enumerate(gathered)]
    return unshard_sequence(shards, plan, dim=dim)


def _check_rank(plan: ShardPlan, rank: int) -> None:
    if not isinstance(rank, int) or not 0 <= rank < plan.world_size:
        raise ValueError(f"rank must be an int in [0, {plan.world_size}), got {rank!r}")
