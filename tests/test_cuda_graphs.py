"""flex_attention inside a CUDA graph: forward and decode calls capture (no host synchronisation, no
allocation outside the graph's pool) and a replay computes what an eager call computes on the same
inputs, captured tensors updated in place between replays included.

The forward kernel has no atomics, so replay and eager run the same launch on the same bytes and
must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from flexattn import Positions, create_block_mask, flex_attention
from flexattn.kernels import decode_workspace
from flexattn.plan import _NOOP_TABLES, DEFAULT_BLOCK_SIZE, noop_tables

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


def _capture(fn):
    """``(graph, outputs)``: ``fn`` warmed up on a side stream (compiles, fills the caches), then
    captured once, as ``torch.cuda.graph``'s documentation asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _refill(*tensors):
    for t in tensors:
        t.copy_(torch.randn_like(t))


def _assert_replay_equals_eager(graph, captured, eager_fn):
    graph.replay()
    torch.cuda.synchronize()
    expected = eager_fn()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want), (got - want).abs().max()


def _qkv(B, Hq, Hkv, Lq, Lkv, E, dtype):
    q = torch.randn(B, Hq, Lq, E, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Lkv, E, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Lkv, E, device="cuda", dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq", [256, 1], ids=lambda n: f"Lq{n}")
def test_noop_replay_equals_eager(Lq, dtype):
    q, k, v = _qkv(1, 4, 4, Lq, 256, 64, dtype)
    run = lambda: flex_attention(q, k, v, return_lse=True)  # noqa: E731
    graph, captured = _capture(run)
    for _ in range(2):  # new inputs in the captured buffers, then replay
        _refill(q, k, v)
        _assert_replay_equals_eager(graph, captured, run)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_block_mask_replay_equals_eager(dtype):
    q, k, v = _qkv(2, 4, 4, 512, 512, 64, dtype)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 512, 512, device="cuda")
    run = lambda: flex_attention(q, k, v, block_mask=mask, return_lse=True)  # noqa: E731
    graph, captured = _capture(run)
    _refill(q, k, v)
    _assert_replay_equals_eager(graph, captured, run)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_captured_tensor_updated_in_place_between_replays_is_read_by_the_replay(dtype):
    q, k, v = _qkv(1, 4, 4, 256, 256, 64, dtype)
    bias = torch.randn(4, device="cuda")

    def alibi(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx - q_idx)

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, device="cuda")
    run = lambda: flex_attention(q, k, v, score_mod=alibi, block_mask=mask, return_lse=True)  # noqa: E731
    graph, captured = _capture(run)
    graph.replay()
    before = captured[0].clone()
    bias.copy_(torch.randn(4, device="cuda") * 4)
    _assert_replay_equals_eager(graph, captured, run)
    assert not torch.equal(captured[0], before)  # the replay read the new bias


def test_a_decode_step_over_a_growing_cache_replays_with_the_position_as_a_tensor():
    """One query token per step over a KV cache of fixed capacity; the step's position is a 0-dim
    tensor updated in place, so one graph serves every step (GQA: 8 query heads, 2 kv heads)."""
    q, k, v = _qkv(2, 8, 2, 1, 1024, 128, torch.bfloat16)
    pos = torch.tensor(0, device="cuda")

    def up_to_pos(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= pos, score, float("-inf"))

    run = lambda: flex_attention(q, k, v, score_mod=up_to_pos, enable_gqa=True, return_lse=True)  # noqa: E731
    graph, captured = _capture(run)
    for step in (0, 17, 500, 1023):
        pos.fill_(step)
        _refill(q)
        _assert_replay_equals_eager(graph, captured, run)


def test_a_split_kv_decode_step_replays_with_its_positions_as_tensors():
    """The split-KV decode kernel (one launch merging its splits, a split workspace whose arrival
    counters each replay leaves at zero) in a graph: ragged
    per-sequence offsets and lengths are device tensors updated in place between replays; eager
    calls of the same shapes in between keep their own workspace (none is kept from the capture)."""
    q, k, v = _qkv(2, 8, 2, 1, 4096, 128, torch.bfloat16)
    lengths = torch.tensor([4096, 1000], dtype=torch.int32, device="cuda")
    offsets = lengths - 1
    positions = Positions(q_offset=offsets, kv_lengths=lengths)
    run = lambda: flex_attention(q, k, v, enable_gqa=True, return_lse=True, positions=positions)  # noqa: E731
    kept = decode_workspace.kept()
    graph, captured = _capture(run)
    assert decode_workspace.kept() <= kept + 1  # the side stream's warm-up only, not the capture
    other_q = torch.randn_like(q)
    for first, second in ((4096, 1), (17, 4000), (0, 2048)):
        lengths.copy_(torch.tensor([first, second], dtype=torch.int32))
        offsets.copy_((lengths - 1).clamp(min=0))
        _refill(q)
        flex_attention(other_q, k, v, enable_gqa=True, positions=positions)  # an eager call in between
        _assert_replay_equals_eager(graph, captured, run)


def test_tables_made_during_capture_are_not_remembered():
    """Tensors made while capturing are written only by replays: an eager call must never get them."""
    device = torch.device("cuda", torch.cuda.current_device())
    q_len = kv_len = 77 * DEFAULT_BLOCK_SIZE  # block counts no other test uses
    key = (77, 77, device)
    _NOOP_TABLES.pop(key, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        noop_tables(q_len, kv_len, device)
    assert key not in _NOOP_TABLES
    eager = noop_tables(q_len, kv_len, device)
    # 77 q-blocks, each listing all 77 kv-blocks as full
    assert key in _NOOP_TABLES and eager.full_kv_num_blocks.flatten().tolist() == [77] * 77
