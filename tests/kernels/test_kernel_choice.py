"""The kernel choice (prefill or decode) and the decode launch shape: pure functions that say why."""

from __future__ import annotations

import pytest
import torch

from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.kernel_choice import PAGED_EXTRA_STAGES, choose_kernel, choose_splits, decode_launch

H200 = DeviceLimits((9, 0), 232448, 132)


def _choice(**changes):
    args = dict(
        q_len=1, kv_len=8192, q_heads=32, kv_heads=8, positions_given=False, kv_offset=0, needs_grad=False,
        per_head_mask=False, prefill_tiles=None,
    )  # fmt: skip
    args.update(changes)
    return choose_kernel(**args)


@pytest.mark.parametrize(
    "changes, kind, says",
    [
        ({}, "decode", "4 heads x 1 tokens = 4 rows"),
        ({"q_len": 32}, "decode", "128 rows fit one tile"),
        ({"q_len": 33}, "prefill", "132 packed rows > 128"),
        ({"q_len": 100, "per_head_mask": True}, "decode", "one head per tile"),
        ({"needs_grad": True}, "prefill", "no backward"),
        ({"needs_grad": True, "positions_given": True}, "unsupported", "inference"),
        ({"positions_given": True, "q_len": 4096}, "decode", "positions"),
        ({"kv_offset": 16, "positions_given": True}, "unsupported", "kv_offset=16"),
        ({"prefill_tiles": "kernel_options BLOCK_M"}, "prefill", "kernel_options BLOCK_M"),
        ({"prefill_tiles": "kernel_options BLOCK_M", "positions_given": True}, "unsupported", "drop them"),
        ({"kv_len": 256}, "decode", "4 heads x 1 tokens = 4 rows"),
        ({"kv_len": 256, "q_len": 8}, "prefill", "Lkv=256 < 2048 with 32 packed rows > 16"),
        ({"kv_len": 300, "positions_given": True}, "decode", "positions"),
        ({"paged": True}, "decode", "4 rows fit one tile: K/V read once per kv head (K/V through the page"),
        ({"paged": True, "positions_given": True}, "decode", "decode kernel (K/V through the page table)"),
        ({"paged": True, "kv_len": 1000}, "decode", "4 heads x 1 tokens = 4 rows"),
        ({"paged": True, "q_len": 33}, "prefill", "132 packed rows > 128"),
    ],
    ids=["decode", "32-tokens", "33-tokens", "per-head", "grad", "grad-positions", "positions", "kv-offset",
         "tiles", "tiles-positions", "short-cache", "short-cache-32-rows", "short-cache-positions", "paged",
         "paged-positions", "paged-short-cache", "paged-33-tokens"],
)  # fmt: skip
def test_choose_kernel_says_why(changes, kind, says):
    choice = _choice(**changes)
    assert choice.kind == kind
    assert says in choice.reason, choice.reason


def test_splits_fill_the_gpu_with_one_full_wave():
    # B8 x 8 kv heads = 64 programs on 132 SMs: one wave, at least 95% of the SMs busy
    splits = choose_splits(64, 1024, H200)
    total = 64 * splits
    assert splits == 2 and total >= 0.95 * 132 and total / (-(-total // 132) * 132) >= 0.95
    assert choose_splits(64, 1, H200) == 1  # never more splits than units of keys
    assert choose_splits(100_000, 50, H200) == 1  # enough programs already
    assert choose_splits(8, 1024, H200) == 16  # B1: 8 programs x 16 splits = 128 of 132 SMs
    # ragged: many more, small splits (the short sequences' ones exit at once)
    assert choose_splits(64, 1024, H200, ragged=True) >= 16 * 132 // 64
    launch = decode_launch(
        batch=8, q_heads=32, kv_heads=8, q_len=8, kv_len=8192, head_dim=128, v_head_dim=128,
        dtype=torch.bfloat16, q_block=None, kv_block=None, per_head_mask=False, target=H200,
    )  # fmt: skip
    assert (launch.tiles.BLOCK_M, launch.splits) == (32, 2)


def test_decode_launch_for_the_benchmark_shape():
    launch = decode_launch(
        batch=8, q_heads=32, kv_heads=8, q_len=4, kv_len=32768, head_dim=128, v_head_dim=128,
        dtype=torch.bfloat16, q_block=None, kv_block=None, per_head_mask=False, target=H200,
    )  # fmt: skip
    assert (launch.pack, launch.tiles.BLOCK_M, launch.m_tiles) == (4, 16, 1)
    assert launch.splits * launch.units_per_split * launch.unit >= 32768
    assert (launch.splits - 1) * launch.units_per_split * launch.unit < 32768  # every split has keys


def test_32_row_tiles_over_a_block_mask_take_narrow_tiles_two_per_sm():
    shape = dict(
        batch=8, q_heads=32, kv_heads=8, q_len=8, kv_len=8192, head_dim=128, v_head_dim=128,
        dtype=torch.bfloat16, per_head_mask=False, target=H200,
    )  # fmt: skip
    dense, sparse = (
        decode_launch(**shape, q_block=None, kv_block=None),
        decode_launch(**shape, q_block=128, kv_block=256),
    )
    assert (dense.tiles.BLOCK_M, dense.tiles.BLOCK_N, dense.tiles.waves, dense.splits) == (32, 128, 1, 2)
    assert (sparse.tiles.BLOCK_M, sparse.tiles.BLOCK_N, sparse.tiles.waves, sparse.splits) == (32, 64, 2, 4)
    assert "2 programs per SM" in sparse.tiles.reason


@pytest.mark.parametrize("page", [16, 256])
def test_paged_decode_tiles_take_more_stages(page):
    # the page-table load takes pipeline stages: K/V keep their buffers with PAGED_EXTRA_STAGES more
    shape = dict(
        batch=8, q_heads=32, kv_heads=8, q_len=4, kv_len=8192, head_dim=128, v_head_dim=128,
        dtype=torch.bfloat16, q_block=128, kv_block=256, per_head_mask=False, target=H200,
    )  # fmt: skip
    contiguous, paged = decode_launch(**shape), decode_launch(**shape, page=page)
    assert paged.tiles.num_stages == contiguous.tiles.num_stages + PAGED_EXTRA_STAGES
    assert (paged.tiles.BLOCK_M, paged.tiles.BLOCK_N, paged.splits) == (
        contiguous.tiles.BLOCK_M, contiguous.tiles.BLOCK_N, contiguous.splits)  # fmt: skip
    assert "paged" in paged.tiles.reason


def test_decode_tiles_keep_a_tile_within_two_q_blocks():
    launch = decode_launch(
        batch=1, q_heads=1, kv_heads=1, q_len=64, kv_len=1024, head_dim=64, v_head_dim=64,
        dtype=torch.float16, q_block=16, kv_block=48, per_head_mask=False, target=H200,
    )  # fmt: skip
    assert launch.tiles.BLOCK_M <= 16 and 48 % launch.tiles.BLOCK_N == 0 and launch.m_tiles == 4


def test_bad_split_counts_raise():
    with pytest.raises(ValueError, match="splits must be an int >= 1"):
        decode_launch(
            batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=64, head_dim=16, v_head_dim=16,
            dtype=torch.float32, q_block=None, kv_block=None, per_head_mask=False, target=H200, splits=0,
        )  # fmt: skip
