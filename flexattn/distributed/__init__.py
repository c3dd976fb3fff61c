"""Context parallelism: attention over a sequence sharded across the ranks of a process group.

::

    plan = plan_shards(block_mask, world_size, "zigzag")          # pure: the same on every rank
    mask = shard_block_mask(block_mask, plan, rank)               # once per mask, shared by layers
    q, k, v = (shard_sequence(t, plan, rank, dim=2) for t in (q, k, v))
    out = ring_flex_attention(q, k, v, mask, score_mod=...)      # this rank's rows of the result

See docs/context_parallel.md.
"""

from flexattn.distributed.plan import STRATEGIES, Segment, ShardPlan, plan_shards
from flexattn.distributed.ring import ring_flex_attention
from flexattn.distributed.ring_run import RingStats
from flexattn.distributed.shard_mask import ShardedMask, ShardPair, shard_block_mask
from flexattn.distributed.sharding import gather_sequence, global_positions, shard_sequence, unshard_sequence

__all__ = [
    "STRATEGIES",
    "RingStats",
    "Segment",
    "ShardPair",
    "ShardPlan",
    "ShardedMask",
    "gather_sequence",
    "global_positions",
    "plan_shards",
    "ring_flex_attention",
    "shard_block_mask",
    "shard_sequence",
    "unshard_sequence",
]
