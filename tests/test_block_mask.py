"""BlockMask construction and manipulation, specified against dense masks from create_mask.

Block classification rule (flexattn.block_mask_build): a block is *full* when every in-range pair is
allowed, *partial* when some are, and unlisted when none are; positions past the lengths are ignored.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn import BlockMask, and_masks, create_block_mask, create_mask, flex_attention, noop_mask, or_masks
from flexattn.block_mask_build import classify_blocks
from tests.catalog import CATALOG, MASK_MODS

I32 = torch.int32


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def block_reduce(dense: torch.Tensor, q_block: int, kv_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Lq, Lkv) bool -> any / all over each block's in-range positions, (B, H, NQ, NKV)."""
    B, H, Lq, Lkv = dense.shape
    nq, nkv = -(-Lq // q_block), -(-Lkv // kv_block)
    padded_any = torch.zeros(B, H, nq * q_block, nkv * kv_block, dtype=torch.bool)
    padded_all = torch.ones(B, H, nq * q_block, nkv * kv_block, dtype=torch.bool)
    padded_any[..., :Lq, :Lkv] = dense
    padded_all[..., :Lq, :Lkv] = dense

    def blocks(x):
        return x.reshape(B, H, nq, q_block, nkv, kv_block).transpose(3, 4)

    return blocks(padded_any).any(-1).any(-1), blocks(padded_all).all(-1).all(-1)


def listed(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    """Dense bool (..., R, ncols) from an ordered block list, built with Python loops."""
    out = torch.zeros(*num.shape, ncols, dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(n) for n in num.shape)).reshape(-1, num.dim()).tolist():
        for c in idx[tuple(pos)][: num[tuple(pos)]].tolist():
            out[tuple(pos) + (c,)] = True
    return out


def assert_well_formed(mask: BlockMask) -> None:
    """Counts in range, valid entries sorted ascending, q-side lists = transpose of kv-side lists."""
    nq, nkv = mask.kv_indices.shape[-2:]
    pairs = [(mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)]
    if mask.full_kv_num_blocks is not None:
        pairs.append(
            (mask.full_kv_num_blocks, mask.full_kv_indices, mask.full_q_num_blocks, mask.full_q_indices)
        )
    for kv_num, kv_idx, q_num, q_idx in pairs:
        for t in (kv_num, kv_idx, q_num, q_idx):
            assert t.dtype == I32 and t.is_contiguous()
        assert kv_idx.shape[-2:] == (nq, nkv) and q_idx.shape[-2:] == (nkv, nq)
        for num, idx in ((kv_num, kv_idx), (q_num, q_idx)):
            slot = torch.arange(idx.shape[-1])
            valid = slot < num.unsqueeze(-1)
            ascending = (idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]
            assert bool(ascending.all()), "valid block indices must be strictly ascending"
        assert torch.equal(listed(kv_num, kv_idx, nkv).transpose(-2, -1), listed(q_num, q_idx, nq))


# ---- round trips against create_mask --------------------------------------------------------------

GRIDS = [
    # (B, H, Lq, Lkv, BLOCK_SIZE)
    (2, 3, 37, 53, 16),
    (1, 2, 64, 64, (16, 32)),
    (2, 1, 97, 31, (32, 8)),
]


@pytest.mark.parametrize("grid", GRIDS, ids=[f"B{g[0]}-H{g[1]}-L{g[2]}/{g[3]}-blk{g[4]}" for g in GRIDS])
@pytest.mark.parametrize("entry", list(MASK_MODS), ids=list(MASK_MODS))
def test_blocks_match_dense_mask_downsampled(entry, grid):
    B, H, Lq, Lkv, block = grid
    mask_mod = MASK_MODS[entry](B, H, Lq, Lkv, "cpu")
    q_block, kv_block = (block, block) if isinstance(block, int) else block
    mask = create_block_mask(mask_mod, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=block)
    dense = create_mask(mask_mod, B, H, Lq, Lkv, device="cpu")
    any_, all_ = block_reduce(dense, q_block, kv_block)

    assert mask.shape == (B, H, Lq, Lkv) and (q_block, kv_block) == mask.BLOCK_SIZE
    assert torch.equal(mask.to_dense().bool(), any_)
    assert torch.equal(mask._dense_blocks(full=True), all_)
    assert torch.equal(mask._dense_blocks(full=False), any_ & ~all_)
    assert_well_formed(mask)


def test_create_mask_evaluates_per_element_like_a_python_loop():
    mods = CATALOG["interval-gather-then-index"](1, 1, 9, 11, "cpu")
    dense = create_mask(mods.mask_mod, 1, 1, 9, 11, device="cpu")
    for i in range(9):
        for j in range(11):
            want = bool(mods.mask_mod(*(torch.tensor(x, dtype=I32) for x in (0, 0, i, j))))
            assert bool(dense[0, 0, i, j]) == want


def test_create_mask_from_score_mod_marks_finite_scores():
    def banded(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx - kv_idx).abs() <= 1, score * 2, -math.inf)

    dense = create_mask(banded, None, None, 5, 5, device="cpu")
    want = torch.ones(5, 5, dtype=torch.bool).triu(-1).tril(1)
    assert torch.equal(dense[0, 0], want)


def test_causal_tail_blocks_below_the_diagonal_are_full():
    # 300 = 2 * 128 + 44: the last q block row is short; its off-diagonal blocks are still full.
    mask = create_block_mask(causal, None, None, 300, 300, device="cpu")
    full = mask._dense_blocks(full=True)[0, 0]
    partial = mask._dense_blocks(full=False)[0, 0]
    assert full.tolist() == [[False, False, False], [True, False, False], [True, True, False]]
    assert partial.tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_separate_full_blocks_false_lists_everything_as_partial():
    mask = create_block_mask(
        causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False
    )
    assert mask.full_kv_num_blocks is None and mask.full_q_indices is None
    assert mask.kv_num_blocks[0, 0].tolist() == [1, 2, 3, 4]


def test_mask_mod_may_return_python_bool():
    mask = create_block_mask(lambda b, h, q, kv: True, None, None, 40, 24, device="cpu", BLOCK_SIZE=16)
    assert mask.full_kv_num_blocks[0, 0].tolist() == [2, 2, 2] and int(mask.kv_num_blocks.sum()) == 0


# ---- combinators ---------------------------------------------------------------------------------


def test_and_or_noop_masks():
    def even_kv(b, h, q, kv):
        return kv % 2 == 0

    grid = (None, None, 6, 6)
    c = create_mask(causal, *grid, device="cpu")
    e = create_mask(even_kv, *grid, device="cpu")
    assert torch.equal(create_mask(and_masks(causal, even_kv), *grid, device="cpu"), c & e)
    assert torch.equal(create_mask(or_masks(causal, even_kv), *grid, device="cpu"), c | e)
    assert bool(create_mask(and_masks(), *grid, device="cpu").all())
    assert not bool(create_mask(or_masks(), *grid, device="cpu").any())
    assert bool(create_mask(noop_mask, *grid, device="cpu").all())


def test_combinators_reject_non_mask_mods():
    with pytest.raises(TypeError, match="and_masks argument 1 must take 4 positional arguments"):
        and_masks(causal, lambda s, b, h, q, kv: s)
    with pytest.raises(TypeError, match="or_masks argument 0 must be callable"):
        or_masks(3)


# ---- broadcast, slicing, adjust, device ------------------------------------------------------------


def test_none_batch_and_heads_broadcast_in_attention():
    B, H, L = 3, 2, 40
    mask_b = create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    mask_full = create_block_mask(causal, B, H, L, L, device="cpu", BLOCK_SIZE=16)
    assert mask_b.kv_num_blocks.shape == (1, 1, 3) and mask_full.kv_num_blocks.shape == (B, H, 3)
    q, k, v = (torch.randn(B, H, L, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        flex_attention(q, k, v, block_mask=mask_b), flex_attention(q, k, v, block_mask=mask_full)
    )


def per_batch_head(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 4 * b + 8 * h


@pytest.mark.parametrize(
    "index",
    [1, (slice(None), 1), (0, slice(1, 3)), (slice(None), slice(None), torch.tensor([2, 0])), (-1, -1, 1)],
    ids=["batch-int", "head-int", "batch-int-head-slice", "q-blocks-tensor", "negative-ints"],
)
def test_slicing_selects_the_same_blocks_as_slicing_the_dense_view(index):
    mask = create_block_mask(per_batch_head, 2, 3, 70, 70, device="cpu", BLOCK_SIZE=16)
    sliced = mask[index]
    full_index = index if isinstance(index, tuple) else (index,)
    full_index = tuple(
        slice(i % n, i % n + 1) if isinstance(i, int) else i for i, n in zip(full_index, (2, 3, 5))
    )
    assert torch.equal(sliced.to_dense(), mask.to_dense()[full_index])
    assert torch.equal(sliced._dense_blocks(full=True), mask._dense_blocks(full=True)[full_index])
    assert sliced.kv_indices.dim() == 4
    assert_well_formed(sliced)
    with pytest.raises(RuntimeError, match="sliced"):
        sliced.mask_mod(*(torch.tensor(0, dtype=I32),) * 4)


def test_sliced_mask_needs_a_new_mask_mod_before_use():
    mask = create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    row = mask[:, :, torch.tensor([3])]  # the last q block, e.g. for decoding
    assert row.seq_lengths == (16, 64)
    q, k, v = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match="sliced"):
        flex_attention(q, k, v, block_mask=row)
    row.mask_mod = lambda b, h, q_idx, kv_idx: mask.mask_mod(b, h, q_idx + 48, kv_idx)
    want = flex_attention(torch.cat([torch.zeros(1, 1, 48, 8), q], 2), k, v, block_mask=mask)[:, :, 48:]
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=row), want)


def test_adjust_crops_to_the_top_left_corner():
    big = create_block_mask(causal, None, None, 100, 120, device="cpu", BLOCK_SIZE=16)
    small = big._adjust(50, 70)
    fresh = create_block_mask(causal, None, None, 50, 70, device="cpu", BLOCK_SIZE=16)
    assert small.seq_lengths == (50, 70)
    assert torch.equal(small.to_dense(), fresh.to_dense())
    assert_well_formed(small)
    with pytest.raises(ValueError, match="can only shrink"):
        big._adjust(200, 120)


def test_to_device_moves_every_tensor():
    mask = create_block_mask(causal, 2, None, 33, 33, device="cpu", BLOCK_SIZE=16)
    moved = mask.to("meta")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_indices", "q_indices", "full_q_num_blocks"):
        assert getattr(moved, name).device.type == "meta"
    assert mask.kv_indices.device.type == "cpu" and moved.mask_mod is mask.mask_mod


# ---- from_kv_blocks ----------------------------------------------------------------------------------


def test_from_kv_blocks_derives_q_side_and_defaults():
    num = torch.tensor([1, 2, 0], dtype=I32)  # 2-D input: (NQ,) and (NQ, NKV)
    idx = torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=I32)
    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(8, 4))
    assert mask.seq_lengths == (24, 8) and mask.mask_mod is noop_mask
    assert mask.kv_num_blocks.shape == (1, 1, 3)
    assert mask.q_num_blocks[0, 0].tolist() == [1, 2]
    assert mask.q_indices[0, 0, 0, :1].tolist() == [1] and mask.q_indices[0, 0, 1, :2].tolist() == [0, 1]
    assert mask.full_kv_num_blocks is None
    assert_well_formed(mask)


def test_from_kv_blocks_rejects_half_a_full_pair():
    num, idx = torch.ones(1, 1, 1, dtype=I32), torch.zeros(1, 1, 1, 1, dtype=I32)
    with pytest.raises(ValueError, match="both full_kv_num_blocks and full_kv_indices"):
        BlockMask.from_kv_blocks(num, idx, full_kv_num_blocks=num)


# ---- pictures and statistics ----------------------------------------------------------------------


def test_to_string_draws_full_partial_and_empty_blocks():
    mask = create_block_mask(causal, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)
    assert mask.to_string() == "b=0, h=0\n░░    \n██░░  \n████░░"
    assert "sparsity=" in str(mask) and "b=0, h=0" in str(mask)


def test_to_string_downsamples_and_limits():
    mask = create_block_mask(per_batch_head, 2, 3, 640, 640, device="cpu", BLOCK_SIZE=16)
    text = mask.to_string(grid_size=10, limit=2)
    pictures = text.split("b=")
    assert len(pictures) == 3 and "more" in pictures[-1]
    assert all(len(line) == 20 for line in pictures[1].splitlines()[1:])


def test_sparsity_shape_numel_and_repr():
    mask = create_block_mask(causal, None, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert mask.shape == (1, 2, 64, 64) and mask.numel() == 2 * 64 * 64
    assert mask.sparsity() == pytest.approx(100 * 6 / 16)  # 6 of 16 blocks never visited
    tail = create_block_mask(causal, None, None, 300, 300, device="cpu")
    visited = 3 * 128 * 128 + 2 * 44 * 128 + 44 * 44
    assert tail.sparsity() == pytest.approx(100 * (1 - visited / 300**2))
    text = repr(mask)
    assert "kv_indices=(1, 2, 4, 4)" in text and "BLOCK_SIZE=(16, 16)" in text and "mask_mod=causal" in text


# ---- argument errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (
            dict(mask_mod=lambda s, b, h, q, kv: s),
            TypeError,
            "mask_mod must take 4 positional arguments.*score_mod",
        ),
        (dict(mask_mod="causal"), TypeError, "mask_mod must be callable"),
        (dict(B=0), ValueError, "B must be a positive int or None"),
        (dict(Q_LEN=-3), ValueError, "Q_LEN must be a positive int, got -3"),
        (dict(BLOCK_SIZE=(16, 0)), ValueError, r"BLOCK_SIZE must be .* got \(16, 0\)"),
        (dict(mask_mod=lambda b, h, q, kv: (q - kv).float()), TypeError, "must return a bool tensor"),
    ],
    ids=["score-mod-as-mask", "not-callable", "zero-batch", "negative-length", "zero-block", "float-result"],
)
def test_create_block_mask_errors(kwargs, error, pattern):
    args = dict(mask_mod=causal, B=None, H=None, Q_LEN=32, KV_LEN=32, device="cpu") | kwargs
    with pytest.raises(error, match=pattern):
        create_block_mask(**args)


# ---- size: bounded memory for long sequences ------------------------------------------------------

_BUILD_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from flexattn import create_block_mask
    L = 16384
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device="cpu")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    n = L // 128
    assert mask.full_kv_num_blocks[0, 0].tolist() == list(range(n))
    assert mask.kv_num_blocks[0, 0].tolist() == [1] * n
    print(grown)
    """
)


def test_long_causal_mask_builds_in_bounded_memory():
    # The dense (L, L) bool mask alone would be 256 MiB.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 100


# ---- property: any pattern, any shape ---------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Lq=st.integers(1, 70),
    Lkv=st.integers(1, 70),
    q_block=st.sampled_from([1, 4, 16, 32]),
    kv_block=st.sampled_from([2, 8, 16, 64]),
    density=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_table_masks_round_trip(B, H, Lq, Lkv, q_block, kv_block, density, seed):
    table = torch.rand(B, H, Lq, Lkv, generator=torch.Generator().manual_seed(seed)) < density

    def from_table(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx]

    mask = create_block_mask(from_table, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=(q_block, kv_block))
    any_, all_ = block_reduce(table, q_block, kv_block)
    assert torch.equal(mask._dense_blocks(full=True), all_)
    assert torch.equal(mask._dense_blocks(full=False), any_ & ~all_)
    assert_well_formed(mask)


@pytest.mark.parametrize(
    "budget",
    [1, 16 * 40, 3 * 16 * 70],
    ids=["per-batch-head-kv-block", "per-batch-head-kv-chunk", "per-batch"],
)
def test_small_budgets_split_work_without_changing_blocks(budget):
    whole = classify_blocks(per_batch_head, 2, 3, 70, 70, 16, 16, "cpu")
    split = classify_blocks(per_batch_head, 2, 3, 70, 70, 16, 16, "cpu", budget=budget)
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
