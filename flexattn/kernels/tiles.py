"""Tile sizes and launch parameters for the forward kernel: small pure functions that say why.

:func:`forward_tiles` picks ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` from the head dims, dtype,
GPU generation and the BlockMask's block sizes, honours user overrides from ``KernelOptions`` and
raises a clear error for combinations the kernel cannot run. :class:`TileCache` stores autotuned
choices on disk (``$FLEXATTN_CACHE_DIR`` or ``~/.cache/flexattn``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from flexattn.options import DEFAULT_OPTIONS


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of the forward kernel and the reason it was chosen."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    reason: str = ""
    use_tma: bool = False  # load K/V through Hopper tensor descriptors (TMA)
    pipeline_qk: bool = False  # issue the next tile's q.k^T before this tile's softmax
    warp_specialize: bool = False  # Triton's automatic warp specialization of the kv loop (Hopper+)
    max_registers: int | None = None  # per-thread register cap (more programs per SM, some spills)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 16 (the dot's minimum)."""
    return max(16, next_power_of_2(head_dim))


def largest_tile_dividing(sparse_block: int, limit: int) -> int:
    """The largest power of two >= 16 that divides ``sparse_block`` and is <= ``limit``."""
    tile = 16
    while tile * 2 <= limit and sparse_block % (tile * 2) == 0:
        tile *= 2
    return tile


def shared_memory_bytes(tiles: Tiles, head_dim_pad: int, v_head_dim_pad: int, elem_bytes: int) -> int:
    """Estimated shared memory: the Q tile plus ``num_stages`` buffered K and V tiles."""
    q_tile = tiles.BLOCK_M * head_dim_pad
    kv_tiles = max(1, tiles.num_stages - 1) * tiles.BLOCK_N * (head_dim_pad + v_head_dim_pad)
    return (q_tile + kv_tiles) * elem_bytes


def default_tiles(
    head_dim_pad: int, dtype: torch.dtype, capability: tuple[int, int] | None, masked: bool = True
) -> Tiles:
    """Tuned starting points per GPU generation, head dim and dtype (before any clamping).

    ``masked`` is False when the mask_mod is always true (no element-wise mask work in any tile).
    The Hopper choices are the fastest of the sweep in BENCHMARKS.md (``benchmarks/sweep_tiles.py``).
    """
    if capability is None:
        return Tiles(32, 32, 4, 1, "interpreter: small tiles keep the CPU emulation quick")
    if dtype == torch.float32:
        if head_dim_pad <= 64:
            return Tiles(64, 32, 4, 2, "fp32: half-size tiles (twice the bytes per element)")
        return Tiles(32, 32, 4, 2, "fp32 with a wide head: small tiles to fit shared memory")
    if capability[0] >= 9:
        if head_dim_pad <= 64:
            return Tiles(128, 128, 4, 3, "Hopper, head dim <= 64: 128x128 tiles, 4 warps, 3 stages, TMA "
                         "(fastest for all 7 paper variants)", use_tma=True)  # fmt: skip
        if head_dim_pad <= 128 and not masked:
            return Tiles(128, 64, 4, 3, "Hopper, head dim 128, no mask_mod: 128x64 tiles, 4 warps, 3 stages, "
                         "TMA (fastest for noop, alibi, soft-cap)", use_tma=True)  # fmt: skip
        if head_dim_pad <= 128:
            return Tiles(128, 128, 8, 2, "Hopper, head dim 128: 128x128 tiles, 8 warps, 2 stages, TMA, "
                         "q.k prefetch (fastest for masked variants)", use_tma=True, pipeline_qk=True)  # fmt: skip
        return Tiles(64, 64, 4, 2, "Hopper, head dim 256: small tiles to fit registers", use_tma=True)
    if capability[0] >= 8:
        if head_dim_pad <= 64:
            return Tiles(128, 64, 4, 3, "Ampere, head dim <= 64")
        if head_dim_pad <= 128:
            return Tiles(128, 32, 8, 2, "Ampere, head dim 128")
        return Tiles(64, 32, 4, 2, "Ampere, head dim 256")
    return Tiles(64, 32, 4, 2, "pre-Ampere GPU: conservative tiles")


def forward_tiles(
    *,
    head_dim: int,
    v_head_dim: int,
    dtype: torch.dtype,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    capability: tuple[int, int] | None,
    shared_memory_limit: int | None,
    options,
    masked: bool = True,
    tile_gathers: bool = False,
) -> Tiles:
    """Choose the forward launch configuration.

    ``capability`` is the CUDA compute capability, or None for the Triton interpreter.
    ``options`` is a ``KernelOptions`` (BLOCK_M, BLOCK_N, num_warps, num_stages may be set) or None
    (the defaults).
    ``masked``: whether the mask_mod does element-wise work (False for an always-true mask).
    ``tile_gathers``: a mod gathers one value per score (``KernelMod.tile_gathers``): BLOCK_M is
    capped at 64, since 128 x 64 tiles spill the per-score addresses (compile_report ``--variant
    relbias``: 472 bytes of spills at 128 x 64, none at 64 x 64).
    BLOCK_M must divide ``q_block`` and BLOCK_N must divide ``kv_block`` (one sparse block is then
    visited as whole tiles); defaults are shrunk to fit that, the sequence lengths and shared memory.

    >>> forward_tiles(head_dim=64, v_head_dim=64, dtype=torch.float16, q_len=4096, kv_len=4096,
    ...               q_block=128, kv_block=128, capability=(9, 0), shared_memory_limit=232448,
    ...               options=None).BLOCK_M
    128
    """
    options = DEFAULT_OPTIONS if options is None else options
    return _remembered_forward_tiles(
        head_dim, v_head_dim, dtype, _length_tile(q_len), _length_tile(kv_len), q_block, kv_block, capability,
        shared_memory_limit, options, masked, tile_gathers,
    )  # fmt: skip


def _choose_forward_tiles(
    head_dim, v_head_dim, dtype, q_len_tile, kv_len_tile, q_block, kv_block, capability,
    shared_memory_limit, options, masked, tile_gathers,
) -> Tiles:  # fmt: skip
    """forward_tiles' choice; the lengths enter only as the tiles that cover them (``_length_tile``)."""
    for name, block in (("Q_BLOCK", q_block), ("KV_BLOCK", kv_block)):
        if block < 16 or block % 16:
            raise ValueError(
                f"The BlockMask's {name} is {block}; the Triton kernels need block sizes that are "
                "multiples of 16 (e.g. 16, 32, 64, 128, 256). Rebuild the mask with BLOCK_SIZE=... "
                "or use kernel_options={'BACKEND': 'REFERENCE'}."
            )
    e_pad, ev_pad = padded_head_dim(head_dim), padded_head_dim(v_head_dim)
    if max(e_pad, ev_pad) > 256:
        raise ValueError(
            f"Head dims up to 256 are supported by the Triton kernels, got E={head_dim}, Ev={v_head_dim}."
        )
    tiles = default_tiles(max(e_pad, ev_pad), dtype, capability, masked)
    why = [tiles.reason]
    user_m = options.BLOCK_M
    user_n = options.BLOCK_N
    _check_user_tile("BLOCK_M", user_m, "Q_BLOCK", q_block)
    _check_user_tile("BLOCK_N", user_n, "KV_BLOCK", kv_block)

    if tile_gathers and tiles.BLOCK_M > 64:
        tiles = replace(tiles, BLOCK_M=64)
        why.append("BLOCK_M 64: a mod gathers one value per score (its addresses spill at 128)")
    block_m = user_m or largest_tile_dividing(q_block, min(tiles.BLOCK_M, q_len_tile))
    block_n = user_n or largest_tile_dividing(kv_block, min(tiles.BLOCK_N, kv_len_tile))
    if (block_m, block_n) != (tiles.BLOCK_M, tiles.BLOCK_N):
        why.append(f"tiles ({block_m}, {block_n}) fit the mask blocks ({q_block}, {kv_block}) and lengths")
    tiles = replace(tiles, BLOCK_M=block_m, BLOCK_N=block_n)
    if options.num_warps:
        tiles = replace(tiles, num_warps=options.num_warps)
        why.append("num_warps from kernel_options")
    elif block_m * block_n <= 32 * 32:
        tiles = replace(tiles, num_warps=min(tiles.num_warps, 4))
    if options.num_stages:
        tiles = replace(tiles, num_stages=options.num_stages)
        why.append("num_stages from kernel_options")
    if options.USE_TMA:
        tiles = replace(tiles, use_tma=True)
        why.append("K/V through tensor descriptors (USE_TMA)")

    if shared_memory_limit is not None:
        elem = dtype.itemsize
        user_set = any(getattr(options, k) for k in ("BLOCK_M", "BLOCK_N", "num_stages"))
        while shared_memory_bytes(tiles, e_pad, ev_pad, elem) > shared_memory_limit:
            if user_set:
                raise ValueError(
                    f"kernel_options tiles BLOCK_M={tiles.BLOCK_M}, BLOCK_N={tiles.BLOCK_N}, "
                    f"num_stages={tiles.num_stages} need about "
                    f"{shared_memory_bytes(tiles, e_pad, ev_pad, elem)} bytes of shared memory for "
                    f"head dims ({head_dim}, {v_head_dim}) in {dtype}; this GPU has "
                    f"{shared_memory_limit}. Use smaller tiles or fewer stages."
                )
            smaller = smaller_tiles(tiles)
            if smaller is None:
                break
            tiles = smaller
            why.append("shrunk to fit shared memory")
    return replace(tiles, reason="; ".join(why))


# A pure function of hashable arguments, asked on every call: remembered (errors are not).
_remembered_forward_tiles = functools.lru_cache(maxsize=512)(_choose_forward_tiles)


def smaller_tiles(tiles: Tiles) -> Tiles | None:
    """The next configuration to try when ``tiles`` needs more shared memory than the GPU has:
    one pipeline stage fewer (down to 2), then half the key tile, then half the query tile;
    None when nothing is left to shrink. Halving keeps every tile a divisor of the mask blocks."""
    if tiles.num_stages > 2:
        return replace(tiles, num_stages=tiles.num_stages - 1)
    if tiles.BLOCK_N > 16:
        return replace(tiles, BLOCK_N=tiles.BLOCK_N // 2)
    if tiles.BLOCK_M > 16:
        return replace(tiles, BLOCK_M=tiles.BLOCK_M // 2)
    return None


def _length_tile(length: int) -> int:
    """The smallest power-of-two tile (>= 16) that covers a whole sequence: no bigger tile pays."""
    return max(16, next_power_of_2(length))


def _check_user_tile(name: str, value: int | None, block_name: str, block: int) -> None:
    if value is not None and block % value:
        raise ValueError(
            f"kernel_options['{name}']={value} must divide the BlockMask's {block_name}={block} "
            f"(a sparse block is visited as whole kernel tiles). Pick a power of two that divides "
            f"{block}, or rebuild the mask with a BLOCK_SIZE that is a multiple of {value}."
        )


def autotune_candidates(base: Tiles, q_block: int, kv_block: int) -> list[Tiles]:
    """A small search space around ``base`` that respects the mask's block sizes."""
    out = [base]
    for block_m in (64, 128):
        for block_n in (64, 128):
            if q_block % block_m or kv_block % block_n:
                continue
            for num_warps, num_stages, pipeline in ((4, 3, False), (8, 2, True), (8, 3, True), (8, 3, False)):
                out.append(
                    Tiles(block_m, block_n, num_warps, num_stages, "autotuned", base.use_tma, pipeline)
                )
    return out


class TileCache:
    """Autotuned tile choices, persisted as JSON (one file per kernel family)."""

    def __init__(self, name: str, directory: str | os.PathLike | None = None):
        root = directory or os.environ.get("FLEXATTN_CACHE_DIR") or Path.home() / ".cache" / "flexattn"
        self.path = Path(root) / f"{name}.json"
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def get(self, key: str) -> Tiles | None:
        entry = self._load().get(key)
        return Tiles(**entry) if entry else None

    def put(self, key: str, tiles: Tiles) -> None:
        entries = self._load()
        entries[key] = asdict(tiles)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(self.path)
