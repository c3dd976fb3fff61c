"""plan_shards: every strategy partitions the sequence into whole blocks; zigzag balances a causal mask,
"balanced" balances document masks at least as well as zigzag; bad input is refused by name."""

from __future__ import annotations

import pytest
import torch

from flexattn import create_block_mask
from flexattn.distributed import (
    STRATEGIES,
    global_positions,
    plan_shards,
    shard_block_mask,
    shard_sequence,
    unshard_sequence,
)
from flexattn.variants import causal, document_ids_from_lengths, document_mask, sliding_window


def causal_mask(L: int, block: int = 16):
    return create_block_mask(causal(), None, None, L, L, device="cpu", BLOCK_SIZE=block)


def document_block_mask(B: int, L: int, block: int = 16):
    rows = []
    for _ in range(B):
        lengths, total = [], 0
        while total < L:  # an odd mix: long and short documents
            n = int(torch.randint(1, L // 2, ()))
            lengths.append(min(n, L - total))
            total += lengths[-1]
        rows.append(document_ids_from_lengths(torch.tensor(lengths)))
    mod = document_mask(torch.stack(rows), causal())
    return create_block_mask(mod, B, None, L, L, device="cpu", BLOCK_SIZE=block)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_segments_partition_the_sequence_in_whole_blocks(strategy, world):
    blocks = int(torch.randint(2 * 2 * world, 40, ()))
    mask = causal_mask(16 * blocks)
    plan = plan_shards(mask, world, strategy)
    covered = sorted(p for r in range(world) for p in global_positions(plan, r).tolist())
    assert covered == list(range(mask.seq_lengths[0]))
    assert all(s.start % 16 == 0 and s.stop % 16 == 0 for segs in plan.segments for s in segs)
    assert sum(plan.work) == int(mask.to_dense().sum())  # each visited block is one rank's work


def test_zigzag_balances_a_causal_mask_exactly():
    world = 4
    plan = plan_shards(causal_mask(16 * 2 * world * 3), world, "zigzag")
    assert plan.imbalance == 1.0
    assert plan.segments[0][0].start == 0 and plan.segments[0][-1].stop == plan.seq_len
    assert len({plan.local_len(r) for r in range(world)}) == 1
    assert plan_shards(causal_mask(16 * 24), world, "contiguous").imbalance > 1.5


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_is_at_least_as_even_as_zigzag_on_documents(world):
    mask = document_block_mask(3, 16 * 48)
    zigzag, balanced = (plan_shards(mask, world, s) for s in ("zigzag", "balanced"))
    assert balanced.imbalance <= zigzag.imbalance
    assert balanced.imbalance <= plan_shards(mask, world, "contiguous").imbalance
    chunk = mask.seq_lengths[0] // (2 * world)
    lengths = [balanced.local_len(r) for r in range(world)]
    assert max(lengths) - min(lengths) <= 2 * 16 and abs(lengths[0] - 2 * chunk) <= 16


def test_describe_prints_each_ranks_work():
    plan = plan_shards(causal_mask(256), 2, "zigzag")
    text = plan.describe()
    for rank in range(2):
        assert f"rank {rank}:" in text and f"{plan.work[rank]} blocks" in text
    assert "work max / mean = 1.000" in text


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="multiple of 32 tokens"):
        plan_shards(create_block_mask(causal(), None, None, 100, 100, device="cpu", BLOCK_SIZE=32), 2)
    with pytest.raises(ValueError, match="must be square"):
        plan_shards(create_block_mask(causal(), None, None, 64, 128, device="cpu", BLOCK_SIZE=16), 2)
    with pytest.raises(ValueError, match="8 chunks"):
        plan_shards(causal_mask(96), 4, "zigzag")
    with pytest.raises(ValueError, match="strategy must be one of"):
        plan_shards(causal_mask(96), 2, "round-robin")
    with pytest.raises(ValueError, match="world_size"):
        plan_shards(causal_mask(96), 0)


def test_unequal_block_sizes_plan_in_their_lcm():
    mask = create_block_mask(causal(), None, None, 384, 384, device="cpu", BLOCK_SIZE=(32, 48))
    plan = plan_shards(mask, 2, "zigzag")
    assert plan.unit == 96 and all(s.length % 96 == 0 for segs in plan.segments for s in segs)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_shard_then_unshard_is_the_identity(dim):
    plan = plan_shards(document_block_mask(1, 16 * 20), 3, "balanced")
    shape = [2, 3, 4]
    shape[dim] = plan.seq_len
    x = torch.randn(shape)
    shards = [shard_sequence(x, plan, r, dim=dim) for r in range(3)]
    assert torch.equal(unshard_sequence(shards, plan, dim=dim), x)
    index = global_positions(plan, 1)
    assert torch.equal(shards[1], x.index_select(dim, index))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shard_masks_are_slices_of_the_global_mask(strategy):
    mask = create_block_mask(sliding_window(40), 2, None, 16 * 24, 16 * 24, device="cpu", BLOCK_SIZE=16)
    plan = plan_shards(mask, 3, strategy)
    dense = mask.to_dense()
    for rank in range(3):
        sharded = shard_block_mask(mask, plan, rank)
        for step, pairs in enumerate(sharded.steps):
            source = sharded.source(step)
            for pair in pairs:
                qs, ks = plan.segments[rank][pair.q_segment], plan.segments[source][pair.kv_segment]
                want = dense[:, :, qs.start // 16 : qs.stop // 16, ks.start // 16 : ks.stop // 16]
                if pair.call is None:
                    assert not bool(want.any())
                    continue
                assert torch.equal(pair.call.block_mask.to_dense(), want)
                assert (pair.call.positions.q_offset, pair.call.positions.kv_offset) == (qs.start, ks.start)
                assert [int(t) for t in pair.call.offsets] == [qs.start, ks.start]
    assert sum(shard_block_mask(mask, plan, r).skipped for r in range(3)) > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pair_work_splits_each_ranks_work_by_key_owner(strategy):
    mask = document_block_mask(2, 16 * 24)
    plan = plan_shards(mask, 3, strategy)
    dense = mask.to_dense().sum(dim=(0, 1))  # (NQ, NKV)
    for r in range(3):
        assert sum(plan.pair_work[r]) == plan.work[r]
        for s in range(3):
            want = sum(
                int(dense[qs.start // 16 : qs.stop // 16, ks.start // 16 : ks.stop // 16].sum())
                for qs in plan.segments[r]
                for ks in plan.segments[s]
            )
            assert plan.pair_work[r][s] == want
    slowest = sum(max(plan.step_work(t)) for t in range(3))
    assert plan.ring_busy == pytest.approx(sum(plan.work) / (3 * slowest))
    assert 0 < plan.ring_busy <= 1


def test_the_module_examples_run():
    import doctest

    import flexattn.distributed.plan as plan_module
    import flexattn.distributed.shard_mask as shard_mask_module
    import flexattn.distributed.sharding as sharding_module

    for module in (plan_module, sharding_module, shard_mask_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
