"""Tile choice for the forward and backward kernels: pure decisions, reasons, errors, the disk cache."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from flexattn.kernels.backward_tiles import choose_backward_tiles
from flexattn.kernels.forward import launch_within_resources
from flexattn.kernels.tiles import (
    TileCache,
    Tiles,
    autotune_candidates,
    forward_tiles,
    shared_memory_bytes,
    smaller_tiles,
)
from flexattn.options import KernelOptions

H100 = {"capability": (9, 0), "shared_memory_limit": 232448}
A100 = {"capability": (8, 0), "shared_memory_limit": 166912}


def choose(E=128, Ev=None, dtype=torch.bfloat16, L=8192, blocks=(128, 128), gpu=H100, masked=True, **options):
    return forward_tiles(
        head_dim=E, v_head_dim=Ev or E, dtype=dtype, q_len=L, kv_len=L, q_block=blocks[0], kv_block=blocks[1],
        options=KernelOptions.from_user(options), masked=masked, **gpu,
    )  # fmt: skip


def test_hopper_defaults_use_big_tiles_tma_and_prefetch():
    tiles = choose(E=128)
    assert (tiles.BLOCK_M, tiles.BLOCK_N, tiles.num_warps) == (128, 128, 8)
    assert tiles.use_tma and tiles.pipeline_qk
    assert "Hopper" in tiles.reason


@pytest.mark.parametrize("E, masked, want", [
    (128, False, (128, 64, 4, 3)),   # no mask work: narrower key tiles, 4 warps
    (128, True, (128, 128, 8, 2)),
    (64, True, (128, 128, 4, 3)),
    (64, False, (128, 128, 4, 3)),
])  # fmt: skip
def test_hopper_defaults_depend_on_head_dim_and_mask(E, masked, want):
    tiles = choose(E=E, masked=masked)
    assert (tiles.BLOCK_M, tiles.BLOCK_N, tiles.num_warps, tiles.num_stages) == want
    assert tiles.use_tma


@pytest.mark.parametrize("blocks, want", [((64, 32), (64, 32)), ((16, 256), (16, 128)), ((48, 80), (16, 16))])
def test_tiles_divide_the_mask_blocks(blocks, want):
    tiles = choose(E=64, blocks=blocks)
    assert want == (tiles.BLOCK_M, tiles.BLOCK_N)
    assert blocks[0] % tiles.BLOCK_M == 0 and blocks[1] % tiles.BLOCK_N == 0


def test_short_sequences_get_small_tiles():
    tiles = choose(E=64, L=20)
    assert (tiles.BLOCK_M, tiles.BLOCK_N) == (32, 32)


@pytest.mark.parametrize("E", [16, 24, 80, 96, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("gpu", [H100, A100], ids=["H100", "A100"])
def test_defaults_fit_shared_memory(E, dtype, gpu):
    tiles = choose(E=E, dtype=dtype, gpu=gpu)
    pad = max(16, 1 << (E - 1).bit_length())
    assert shared_memory_bytes(tiles, pad, pad, dtype.itemsize) <= gpu["shared_memory_limit"]


def test_user_tiles_are_honoured():
    tiles = choose(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4)
    assert (tiles.BLOCK_M, tiles.BLOCK_N, tiles.num_warps, tiles.num_stages) == (64, 32, 4, 4)


@pytest.mark.parametrize(
    "options, blocks, message",
    [
        ({"BLOCK_M": 256}, (128, 128), "BLOCK_M'\\]=256 must divide the BlockMask's Q_BLOCK=128"),
        ({"BLOCK_N": 64}, (128, 32), "BLOCK_N'\\]=64 must divide the BlockMask's KV_BLOCK=32"),
        ({}, (100, 128), "Q_BLOCK is 100"),
        ({"BLOCK_M": 128, "BLOCK_N": 128, "num_stages": 8}, (128, 128), "shared memory"),
    ],
    ids=["BLOCK_M-256-vs-128", "BLOCK_N-64-vs-32", "Q_BLOCK-100", "too-many-stages"],
)
def test_impossible_choices_raise(options, blocks, message):
    with pytest.raises(ValueError, match=message):
        choose(E=256, blocks=blocks, **options)


def test_head_dims_over_256_raise():
    with pytest.raises(ValueError, match="up to 256"):
        choose(E=320)


def test_autotune_candidates_respect_the_mask_blocks():
    base = choose(E=64, blocks=(64, 128))
    candidates = autotune_candidates(base, 64, 128)
    assert candidates[0] == base
    assert all(64 % t.BLOCK_M == 0 and 128 % t.BLOCK_N == 0 for t in candidates)
    assert len({(t.BLOCK_M, t.BLOCK_N) for t in candidates}) == 2


def test_tile_cache_round_trips_through_disk(tmp_path):
    tiles = Tiles(64, 128, 4, 3, "autotuned", use_tma=True, pipeline_qk=False)
    TileCache("forward", tmp_path).put("H100|bf16|E64", tiles)
    assert TileCache("forward", tmp_path).get("H100|bf16|E64") == tiles
    assert TileCache("forward", tmp_path).get("other") is None


class FakeCompiler:
    """A launch that fails like Triton's compiler when a configuration needs too much shared memory."""

    def __init__(self, max_block_n: int):
        self.max_block_n, self.tried = max_block_n, []

    def __call__(self, tiles: Tiles) -> None:
        self.tried.append((tiles.BLOCK_M, tiles.BLOCK_N, tiles.num_stages))
        if self.max_block_n < tiles.BLOCK_N:
            raise OutOfResources(262176, 232448, "shared memory")


def test_too_big_a_compiled_kernel_is_shrunk_once_and_the_fit_remembered():
    compiler, key = FakeCompiler(max_block_n=32), ("fit-test", object())  # fresh: none remembered yet
    first = Tiles(128, 128, 8, 3, "default")
    ran = launch_within_resources(compiler, first, key, user_set=False)
    assert (ran.BLOCK_M, ran.BLOCK_N, ran.num_stages) == (128, 32, 2)
    assert compiler.tried == [(128, 128, 3), (128, 128, 2), (128, 64, 2), (128, 32, 2)]
    assert "shared memory" in ran.reason
    compiler.tried.clear()
    assert launch_within_resources(compiler, first, key, user_set=False) == ran
    assert compiler.tried == [(128, 32, 2)]  # straight to the fitted tiles


def test_user_tiles_that_do_not_fit_raise_instead_of_shrinking():
    with pytest.raises(ValueError, match="BLOCK_N=128.*smaller kernel_options tiles"):
        launch_within_resources(FakeCompiler(max_block_n=32), Tiles(64, 128, 4, 2), ("fit-test", 2), True)


@pytest.mark.parametrize(
    "tiles, want",
    [
        (Tiles(128, 128, 8, 4), Tiles(128, 128, 8, 3)),
        (Tiles(128, 128, 8, 2), Tiles(128, 64, 8, 2)),
        (Tiles(64, 16, 4, 2), Tiles(32, 16, 4, 2)),
        (Tiles(16, 16, 4, 1), None),
    ],
    ids=["stages", "block-n", "block-m", "nothing-left"],
)
def test_smaller_tiles_order(tiles, want):
    assert smaller_tiles(tiles) == want


@pytest.mark.parametrize(
    "capability, dtype, E, want",
    [
        ((9, 0), torch.bfloat16, 128, (64, 64, 64, 64, 4, 2, True)),
        ((9, 0), torch.float16, 64, (64, 64, 64, 64, 4, 2, True)),
        ((9, 0), torch.bfloat16, 256, (32, 64, 64, 32, 4, 1, False)),
        ((9, 0), torch.float32, 64, (32, 64, 64, 32, 4, 1, False)),
        ((8, 0), torch.bfloat16, 128, (64, 128, 128, 64, 8, 2, False)),
        (None, torch.float16, 64, (64, 64, 64, 64, 4, 1, False)),
    ],
)
def test_backward_defaults_per_gpu_generation(capability, dtype, E, want):
    t = choose_backward_tiles(E, E, dtype, 128, 128, capability, KernelOptions(), light_score=True)
    assert (t.BLOCK_M1, t.BLOCK_N1, t.BLOCK_M2, t.BLOCK_N2, t.num_warps, t.num_stages, t.use_tma) == want
    assert t.max_registers == (168 if capability == (9, 0) and E <= 64 and dtype != torch.float32 else None)


def test_backward_tiles_shrink_to_the_mask_blocks_and_honour_use_tma():
    t = choose_backward_tiles(128, 128, torch.bfloat16, 32, 16, (8, 0), KernelOptions(USE_TMA=True))
    assert (t.BLOCK_M1, t.BLOCK_N1, t.BLOCK_M2, t.BLOCK_N2, t.use_tma) == (32, 16, 32, 16, True)
    assert "USE_TMA" in t.reason


def test_backward_register_cap_only_with_the_default_tiles_and_a_light_score_mod():
    for options, light, cap in (
        (KernelOptions(), True, 168),
        (KernelOptions(), False, None),
        (KernelOptions(bwd_num_warps=8), True, None),
    ):
        tiles = choose_backward_tiles(64, 64, torch.half, 64, 64, (9, 0), options, light_score=light)
        assert tiles.max_registers == cap


def test_mods_gathering_one_value_per_score_get_64_row_forward_tiles():
    """A relative-position table read at ``q_idx - kv_idx`` holds one address per score: the forward
    caps BLOCK_M at 64 for it (its 128-row tiles spill on sm_90, compile_report --variant relbias)."""
    from flexattn.compiler import compile_score_mod
    from flexattn.variants import alibi

    table = torch.randn(2, 63)
    relative = compile_score_mod(lambda s, b, h, q, kv: s + table[h, q - kv + 31], device="cpu")
    assert relative.tile_gathers and not compile_score_mod(alibi(2), device="cpu").tile_gathers
    common = dict(head_dim=128, v_head_dim=128, dtype=torch.bfloat16, q_len=4096, kv_len=4096, q_block=128,
                  kv_block=128, capability=(9, 0), shared_memory_limit=232448, options=None)  # fmt: skip
    plain, gathering = forward_tiles(**common), forward_tiles(**common, tile_gathers=True)
    assert plain.BLOCK_M == 128 and gathering.BLOCK_M == 64
    assert "gathers" in gathering.reason
