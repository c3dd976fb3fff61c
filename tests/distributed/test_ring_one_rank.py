"""ring_flex_attention in this process, as a group of one rank: the ring degenerates to flex_attention,
and bad input is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexattn import create_block_mask, flex_attention
from flexattn.distributed import plan_shards, ring_flex_attention, shard_block_mask
from flexattn.variants import alibi, causal
from tests.helpers import rel_err


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def causal_problem(L=64, H=2, E=8):
    mask = create_block_mask(causal(), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, H, L, E, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return mask, q, k, v


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_one_rank_is_flex_attention(one_rank, recompute):
    mask, q, k, v = causal_problem()
    sharded = shard_block_mask(mask, plan_shards(mask, 1, "zigzag"), 0)
    out = ring_flex_attention(q, k, v, sharded, score_mod=alibi(2), recompute=recompute)
    want = flex_attention(q, k, v, score_mod=alibi(2), block_mask=mask)
    d_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    gold = torch.autograd.grad(want, (q, k, v), d_out)
    assert rel_err(out, want) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got, gold))


def test_a_mask_for_another_rank_or_world_is_refused(one_rank):
    mask, q, k, v = causal_problem()
    sharded = shard_block_mask(mask, plan_shards(mask, 2, "contiguous"), 1)
    with pytest.raises(ValueError, match="sharded_mask is for rank 1 of 2"):
        ring_flex_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], sharded)


def test_tensors_that_are_not_the_ranks_shard_are_refused(one_rank):
    mask, q, k, v = causal_problem()
    sharded = shard_block_mask(mask, plan_shards(mask, 1, "zigzag"), 0)
    with pytest.raises(ValueError, match=r"key must be this rank's shard \(B, H, 64, E\)"):
        ring_flex_attention(q, k[:, :, :32], v, sharded)
    with pytest.raises(TypeError, match="sharded_mask must be a ShardedMask"):
        ring_flex_attention(q, k, v, mask)


def test_without_a_process_group_the_error_says_how_to_start_one():
    mask, q, k, v = causal_problem()
    sharded = shard_block_mask(mask, plan_shards(mask, 1, "zigzag"), 0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_flex_attention(q, k, v, sharded)


def test_recompute_keeps_no_attention_graph_for_the_backward(one_rank):
    mask, q, k, v = causal_problem(L=128)
    sharded = shard_block_mask(mask, plan_shards(mask, 1, "zigzag"), 0)
    packed = {}
    for recompute in (False, True):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ring_flex_attention(q, k, v, sharded, recompute=recompute)
        packed[recompute] = sum(sizes)
        out.sum().backward()  # both still give gradients
        assert q.grad is not None and k.grad is not None
        q.grad = k.grad = v.grad = None
    assert packed[False] >= k.numel() * k.element_size()  # at least the K/V of the step is kept
    assert packed[True] == 0
