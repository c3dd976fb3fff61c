"""The kernel choice (prefill or decode) and the decode launch shape: pure functions that say why."""

from __future__ import annotations

import pytest
import torch

from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.kernel_choice import choose_kernel, choose_splits, decode_launch

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
        ({"kv_len": 2047}, "prefill", "Lkv=2047 < 2048"),
        ({"kv_len": 300, "positions_given": True}, "decode", "positions"),
        ({"paged": True}, "prefill", "the prefill kernel reads pages faster"),
        ({"paged": True, "positions_given": True}, "decode", "decode kernel (K/V through the page table)"),
        ({"paged": True, "kv_len": 1000}, "prefill", "the prefill kernel reads pages faster"),
        ({"paged": True, "q_len": 33}, "prefill", "the prefill kernel reads pages faster"),
    ],
    ids=["decode", "32-tokens", "33-tokens", "per-head", "grad", "grad-positions", "positions", "kv-offset",
         "tiles", "tiles-positions", "short-cache", "short-cache-positions", "paged", "paged-positions",
         "paged-short-cache", "paged-33-tokens"],
)  # fmt: skip
def test_choose_kernel_says_why(changes, kind, says):
    choice = _choice(**changes)
    assert choice.kind == kind
    assert says in choice.reason, choice.reason


def test_splits_fill_the_gpu_with_full_waves():
    # B8 x 8 kv heads = 64 programs on 132 SMs: at least 2 waves, last wave >= 95% full
    splits = choose_splits(64, 1024, H200)
    total = 64 * splits
    assert total >= 2 * 132 and total / (-(-total // 132) * 132) >= 0.95
    assert choose_splits(64, 3, H200) == 3  # never more splits than units of keys
    assert choose_splits(100_000, 50, H200) == 1  # enough programs already
    # 32+ row tiles run one program per SM: one (95% full) wave, 64 programs x 2 splits on 132 SMs
    assert choose_splits(64, 1024, H200, heavy_tiles=True) == 2
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
