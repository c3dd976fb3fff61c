"""A rank's view of the global BlockMask: one sliced mask per (query segment, key segment) pair it
computes, and which pairs it skips.

Built once per mask and plan (e.g. once per batch, shared by every layer), on every rank alike.
The global mask is expanded to dense block matrices once, O(B * H * NQ * NKV) booleans, as the
BlockMask itself already is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.block_mask import BlockMask
from flexattn.block_mask_build import dense_to_ordered, ordered_to_dense
from flexattn.distributed.plan import ShardPlan
from flexattn.distributed.shard_call import ShardCall


@dataclass(frozen=True)
class ShardPair:
    """One query segment of this rank against one key segment of the visiting rank.

    Fields:
        q_segment: index into this rank's segments; q_rows: its rows in the local query (start, stop).
        kv_segment: index into the visiting rank's segments; kv_rows: its rows in that rank's local K/V.
        call: the sliced mask and offsets (None: no block of the pair is visited, the pair is skipped).
    """

    q_segment: int
    q_rows: tuple[int, int]
    kv_segment: int
    kv_rows: tuple[int, int]
    call: ShardCall | None


@dataclass(frozen=True)
class ShardedMask:
    """The global mask as rank ``rank`` of ``plan`` uses it in the ring.

    ``steps[t]`` are the pairs of ring step t, whose K/V come from rank ``(rank - t) % world_size``.
    """

    plan: ShardPlan
    rank: int
    global_mask: BlockMask
    steps: tuple[tuple[ShardPair, ...], ...]

    def source(self, step: int) -> int:
        """The rank whose K/V this rank holds at ring step ``step``."""
        return (self.rank - step) % self.plan.world_size

    @property
    def calls(self) -> int:
        """Attention calls this rank makes per forward (pairs not skipped)."""
        return sum(p.call is not None for pairs in self.steps for p in pairs)

    @property
    def skipped(self) -> int:
        """Pairs whose blocks this rank's queries never visit: not computed (their K/V still travel)."""
        return sum(p.call is None for pairs in self.steps for p in pairs)


def shard_block_mask(block_mask: BlockMask, plan: ShardPlan, rank: int) -> ShardedMask:
    """Slice ``block_mask`` for rank ``rank`` of ``plan`` (from ``plan_shards`` of the same mask).

    Example:
        >>> from flexattn import create_block_mask
        >>> from flexattn.distributed import plan_shards
        >>> mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256, device="cpu",
        ...                          BLOCK_SIZE=32)
        >>> plan = plan_shards(mask, 2, "contiguous")
        >>> shard_block_mask(mask, plan, 0).skipped   # rank 0 holds the first half: it skips rank 1's keys
        1
    """
    if tuple(block_mask.seq_lengths) != (plan.seq_len, plan.seq_len):
        raise ValueError(
            f"block_mask has seq_lengths {tuple(block_mask.seq_lengths)}, the plan {plan.seq_len} tokens: "
            "make the plan with plan_shards(block_mask, ...) of this mask"
        )
    if not isinstance(rank, int) or not 0 <= rank < plan.world_size:
        raise ValueError(f"rank must be an int in [0, {plan.world_size}), got {rank!r}")
    nkv = block_mask.kv_indices.shape[-1]
    partial = ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nkv)  # (B, H, NQ, NKV)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nkv)
    steps = []
    for step in range(plan.world_size):
        source = (rank - step) % plan.world_size
        pairs = []
        for qi, (q_seg, q_rows) in enumerate(_local_rows(plan, rank)):
            for ki, (kv_seg, kv_rows) in enumerate(_local_rows(plan, source)):
                call = _slice(block_mask, partial, full, q_seg, kv_seg)
                pairs.append(ShardPair(qi, q_rows, ki, kv_rows, call))
        steps.append(tuple(pairs))
    return ShardedMask(plan, rank, block_mask, tuple(steps))


def _local_rows(plan: ShardPlan, rank: int):
    """(segment, (start, stop) rows in the rank's local tensors) for each of the rank's segments."""
    offset = 0
    for seg in plan.segments[rank]:
        yield seg, (offset, offset + seg.length)
        offset += seg.length


def _slice(block_mask, partial, full, q_seg, kv_seg) -> ShardCall | None:
    """The mask of one segment pair, or None when none of its blocks is visited."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    rows = slice(q_seg.start // q_block, q_seg.stop // q_block)
    cols = slice(kv_seg.start // kv_block, kv_seg.stop // kv_block)
    part = partial[:, :, rows, cols]
    whole = full[:, :, rows, cols] if full is not None else torch.zeros_like(part)
    if not bool(part.any()) and not bool(whole.any()):
        return None
    part_num, part_idx = dense_to_ordered(part)
    full_num, full_idx = dense_to_ordered(whole)
    mask = BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=block_mask.mask_mod,
        seq_lengths=(q_seg.length, kv_seg.length),
    )
    return ShardCall.make(mask, q_seg.start, kv_seg.start)
