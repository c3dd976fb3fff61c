"""Sharding plans: which tokens of a sequence each rank owns, chosen from a BlockMask's block counts.

A pure function of the mask (no process group): every rank computes the same plan. A rank's queries
attend to every key of the sequence, so its work is the number of mask blocks its query blocks visit
(partial and full, summed over the mask's batch and heads). Strategies:

- ``"contiguous"``: rank r takes the r-th of N equal runs (a causal mask leaves the last rank ~2N-1
  times the first one's work);
- ``"zigzag"`` (head-tail): 2N equal chunks, rank r takes chunks r and 2N-1-r, which balances a
  causal mask exactly when the chunks are equal;
- ``"balanced"``: ``chunks_per_rank * N`` equal chunks, handed out largest-work first to the rank with
  the least work that still has room (every rank gets as many chunks, so as many tokens, within a
  chunk): balances document masks, where the work per chunk is irregular.

Every chunk is a whole number of ``unit = lcm(Q_BLOCK, KV_BLOCK)`` tokens, so shard masks are slices
of the global one. Example::

    >>> from flexattn import create_block_mask
    >>> mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 1024, 1024, device="cpu",
    ...                          BLOCK_SIZE=64)
    >>> plan = plan_shards(mask, world_size=2, strategy="zigzag")
    >>> plan.segments[0]
    (Segment(start=0, stop=256), Segment(start=768, stop=1024))
    >>> print(plan.describe())      # doctest: +NORMALIZE_WHITESPACE
    ShardPlan zigzag: 1024 tokens on 2 ranks, unit 64 tokens
      rank 0: [0, 256) [768, 1024)  512 tokens  68 blocks
      rank 1: [256, 768)  512 tokens  68 blocks
      work max / mean = 1.000
      ring steps, slowest rank's blocks: [36, 32]; busy 1.000
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexattn.block_mask import BlockMask

STRATEGIES = ("contiguous", "zigzag", "balanced")


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, stop)`` of the global sequence, held contiguously by one rank."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """Which tokens each rank owns.

    Fields:
        seq_len: tokens of the global sequence (Q_LEN == KV_LEN of the mask).
        unit: tokens per planning unit, lcm(Q_BLOCK, KV_BLOCK); every segment is whole units.
        strategy: the strategy that made the plan.
        segments: per rank, its segments in ascending order; a rank's local tensors hold its
            segments one after another (``shard_sequence``).
        work: per rank, the mask blocks its queries visit.
        pair_work: ``pair_work[r][s]``: the blocks rank r's queries visit among rank s's keys (ring
            step t runs ``pair_work[r][(r - t) % N]`` on every rank r at once), or None.
    """

    seq_len: int
    unit: int
    strategy: str
    segments: tuple[tuple[Segment, ...], ...]
    work: tuple[int, ...]
    pair_work: tuple[tuple[int, ...], ...] | None = None

    @property
    def world_size(self) -> int:
        return len(self.segments)

    def local_len(self, rank: int) -> int:
        """Tokens rank ``rank`` holds (the length of its local q / k / v)."""
        return sum(s.length for s in self.segments[rank])

    @property
    def imbalance(self) -> float:
        """max / mean of the per-rank work (1.0 is perfect balance)."""
        mean = sum(self.work) / len(self.work)
        return max(self.work) / mean if mean > 0 else 1.0

    def step_work(self, step: int) -> tuple[int, ...]:
        """Blocks each rank computes at ring step ``step`` (its queries, rank (r - step)'s keys)."""
        n = self.world_size
        return tuple(self.pair_work[r][(r - step) % n] for r in range(n))

    @property
    def ring_busy(self) -> float:
        """Fraction of the ranks' step time spent computing when every ring step lasts as long as its
        slowest rank (1.0: every step is balanced)."""
        slowest = sum(max(self.step_work(t)) for t in range(self.world_size))
        return sum(self.work) / (self.world_size * slowest) if slowest else 1.0

    def describe(self) -> str:
        """One line per rank: segments, tokens and visited blocks; then the imbalance and, per ring
        step, the slowest rank's blocks."""
        lines = [
            f"ShardPlan {self.strategy}: {self.seq_len} tokens on {self.world_size} ranks, "
            f"unit {self.unit} tokens"
        ]
        for rank, (segments, work) in enumerate(zip(self.segments, self.work)):
            spans = " ".join(f"[{s.start}, {s.stop})" for s in segments)
            lines.append(f"  rank {rank}: {spans}  {self.local_len(rank)} tokens  {work} blocks")
        lines.append(f"  work max / mean = {self.imbalance:.3f}")
        if self.pair_work is not None:
            slowest = [max(self.step_work(t)) for t in range(self.world_size)]
            lines.append(f"  ring steps, slowest rank's blocks: {slowest}; busy {self.ring_busy:.3f}")
        return "\n".join(lines)


def plan_shards(
    block_mask: BlockMask, world_size: int, strategy: str = "zigzag", *, chunks_per_rank: int = 2
) -> ShardPlan:
    """A sharding plan of ``block_mask``'s sequence over ``world_size`` ranks (module docstring).

    Args:
        block_mask: the global mask, (Q_LEN, KV_LEN) with Q_LEN == KV_LEN a multiple of
            lcm(Q_BLOCK, KV_BLOCK).
        world_size: number of ranks, >= 1.
        strategy: "contiguous", "zigzag" or "balanced".
        chunks_per_rank: chunks per rank for "balanced" (more chunks: finer balance, more calls).
    Returns:
        a :class:`ShardPlan`.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flexattn.BlockMask, got {type(block_mask).__name__}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(chunks_per_rank, int) or chunks_per_rank < 1:
        raise ValueError(f"chunks_per_rank must be an int >= 1, got {chunks_per_rank!r}")
    visited = _visited_blocks(block_mask)
    unit_work, unit = _unit_work(block_mask, visited)
    chunks = {"contiguous": 1, "zigzag": 2, "balanced": chunks_per_rank}[strategy] * world_size
    if len(unit_work) < chunks:
        raise ValueError(
            f"strategy {strategy!r} cuts the sequence into {chunks} chunks of whole {unit}-token blocks, "
            f"but the mask has only {len(unit_work)} such blocks ({block_mask.seq_lengths[0]} tokens). "
            "Use a longer sequence, fewer ranks, a smaller BLOCK_SIZE or the 'contiguous' strategy."
        )
    bounds = _even_bounds(len(unit_work), chunks)  # chunk c is units [bounds[c], bounds[c + 1])
    chunk_work = [sum(unit_work[bounds[c] : bounds[c + 1]]) for c in range(chunks)]
    if strategy == "contiguous":
        owners = [[r] for r in range(world_size)]
    elif strategy == "zigzag":
        owners = [[r, 2 * world_size - 1 - r] for r in range(world_size)]
    else:
        owners = _largest_first(chunk_work, world_size, chunks_per_rank)
    segments = tuple(_merge_runs(sorted(cs), bounds, unit) for cs in owners)
    work = tuple(sum(chunk_work[c] for c in cs) for cs in owners)
    pair_work = _pair_work(visited, segments, block_mask.BLOCK_SIZE)
    return ShardPlan(block_mask.seq_lengths[0], unit, strategy, segments, work, pair_work)


def _visited_blocks(block_mask: BlockMask) -> torch.Tensor:
    """int64 (NQ, NKV): how many (b, h) of the mask visit each block."""
    return block_mask.to_dense().sum(dim=(0, 1), dtype=torch.int64)


def _pair_work(visited: torch.Tensor, segments, block_size) -> tuple[tuple[int, ...], ...]:
    """Blocks rank r's query segments visit among rank s's key segments, for every (r, s)."""
    q_block, kv_block = block_size

    def blocks(segs, size):
        return torch.cat([torch.arange(s.start // size, s.stop // size) for s in segs])

    rows = [visited.index_select(0, blocks(segs, q_block).to(visited.device)) for segs in segments]
    cols = [blocks(segs, kv_block).to(visited.device) for segs in segments]
    return tuple(tuple(int(r.index_select(1, c).sum()) for c in cols) for r in rows)


def _unit_work(block_mask: BlockMask, visited: torch.Tensor) -> tuple[list[int], int]:
    """Visited blocks per planning unit of query rows, and the unit in tokens."""
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_len != kv_len:
        raise ValueError(
            f"context parallelism shards one sequence for self-attention: the mask must be square, "
            f"got (Q_LEN, KV_LEN)={tuple(block_mask.seq_lengths)}"
        )
    unit = math.lcm(q_block, kv_block)
    if q_len % unit:
        raise ValueError(
            f"the sequence length {q_len} is not a multiple of {unit} tokens (lcm of the mask's "
            f"BLOCK_SIZE={tuple(block_mask.BLOCK_SIZE)}): shards must be whole blocks. Pad the sequence "
            f"to a multiple of {unit} (e.g. {-(-q_len // unit) * unit}) or build the mask with a block "
            "size that divides it."
        )
    per_q_block = visited.sum(dim=1)  # (NQ,) visited blocks over b, h, kv
    per_unit = per_q_block.reshape(-1, unit // q_block).sum(dim=1)
    return [int(w) for w in per_unit.tolist()], unit


def _even_bounds(n: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` runs of ``n`` items whose sizes differ by at most one."""
    return [p * n // parts for p in range(parts + 1)]


def _largest_first(chunk_work: list[int], world_size: int, per_rank: int) -> list[list[int]]:
    """Chunks to ranks, largest work first, each to the least-loaded rank with room (ties: lowest)."""
    owners: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for c in sorted(range(len(chunk_work)), key=lambda c: (-chunk_work[c], c)):
        rank = min((r for r in range(world_size) if len(owners[r]) < per_rank), key=lambda r: (load[r], r))
        owners[rank].append(c)
        load[rank] += chunk_work[c]
    return owners


def _merge_runs(chunks: list[int], bounds: list[int], unit: int) -> tuple[Segment, ...]:
    """Ascending chunk ids -> segments in tokens, adjacent chunks joined into one."""
    segments: list[Segment] = []
    for c in chunks:
        start, stop = bounds[c] * unit, bounds[c + 1] * unit
        if segments and segments[-1].stop == start:
            segments[-1] = Segment(segments[-1].start, stop)
        else:
            segments.append(Segment(start, stop))
    return tuple(segments)
