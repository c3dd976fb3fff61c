"""Which forward kernel runs a call (prefill or split-KV decode), and the decode kernel's launch shape.

Small pure functions that say why: :func:`choose_kernel` returns a :class:`KernelChoice`
(``AttentionPlan.explain`` prints it); :func:`decode_launch` fixes the decode kernel's tiles, GQA
packing and number of key splits from the shapes and the GPU (the same function the launcher uses,
so the explanation is what runs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.tiles import largest_tile_dividing, next_power_of_2, padded_head_dim

DECODE_MAX_ROWS = 128  # packed query rows (heads x tokens) one decode tile holds
# Caches shorter than SHORT_CACHE_LEN take the decode kernel only up to SHORT_CACHE_ROWS packed rows
# (decode steps, measured: choose_kernel); more rows there are a small prefill (prefill's tiles).
SHORT_CACHE_LEN, SHORT_CACHE_ROWS = 2048, 16
# Key splits aim for one (95% full) wave: one program per SM streams K/V at full bandwidth (two
# shared-memory buffers of K and V in flight), and every further split adds its fixed cost (the block
# lists' search, the partial result's store and merge). H200, B8 Hq32 Hkv8 E128 bf16, 8k keys, 64
# programs (bench_decode.py's split sweep): Lq1 noop 2 splits 3.94 TB/s, 4: 3.71, 6 (two waves): 3.57;
# Lq1 causal+alibi 3.75 / 3.44 / 3.18; Lq8 (32-row tiles) 3.80 / 3.51 / 3.26.
SPLIT_WAVES, SPLIT_FILL = 1, 0.95
# 32-row tiles over a block mask (Lq 8 with GQA groups of 4): the block-sparse walk does better on
# 64-key tiles, two programs per SM. H200 8k keys, Lq8 causal+alibi: 32x64 tiles at 4 splits 3.48
# TB/s, 32x128 at 2 splits 3.26 (noop keeps 32x128: 3.71 against 3.61).
SPARSE_NARROW_ROWS, SPARSE_NARROW_WAVES = 32, 2
RAGGED_SPLIT_WAVES = 16  # ragged batches: splits sized for the padded length, so many more (short ones exit)
PAGED_EXTRA_STAGES = 2  # decode over a page table: see decode_tiles
INTERPRETER_SMS = 4  # "SMs" assumed without a GPU: a few splits, quick on the CPU


@dataclass(frozen=True)
class KernelChoice:
    """``kind``: "prefill", "decode" or "unsupported" (``reason`` then says what to change)."""

    kind: str
    reason: str
    splits: int | None = None  # decode: key splits per (sequence, head group)

    def __str__(self) -> str:
        splits = f", {self.splits} key splits" if self.splits else ""
        return f"{self.kind}{splits}: {self.reason}"


@dataclass(frozen=True)
class DecodeTiles:
    """One launch configuration of the decode kernel."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    reason: str = ""
    waves: int = SPLIT_WAVES  # programs per SM the key splits aim for (choose_splits)


@dataclass(frozen=True)
class DecodeLaunch:
    """The decode kernel's launch: tiles, heads per tile, row tiles per head group, key splits."""

    tiles: DecodeTiles
    pack: int  # query heads packed into one tile (the GQA group, or 1 with a per-head block mask)
    m_tiles: int  # row tiles per head group (pack * Lq rows in tiles of BLOCK_M)
    unit: int  # split granularity in keys: the mask's kv block, or BLOCK_N without a mask
    splits: int
    units_per_split: int


def decode_tiles(
    *,
    pack: int,
    q_len: int,
    head_dim: int,
    v_head_dim: int,
    dtype: torch.dtype,
    q_block: int | None,
    kv_block: int | None,
    capability: tuple[int, int] | None,
    page: int = 0,
) -> DecodeTiles:
    """Tiles for ``pack * q_len`` packed rows: BLOCK_M the next power of two >= 16 (at most 128, and
    at most ``pack * q_block`` so that one tile's tokens touch at most two q blocks of the mask);
    BLOCK_N wide enough to stream K/V at full bandwidth, dividing kv_block.

    ``page`` > 0 (K/V through a page table): ``PAGED_EXTRA_STAGES`` more pipeline stages. The tile's
    page-table entry (and the block-list entry it is found from) is a load the K/V addresses wait on,
    and Triton's pipeliner gives each link of that chain a stage of its own: with the contiguous
    count, K and V get one shared-memory buffer instead of two (compile_report.py: 73,744 bytes
    against 139,264 at 128-key tiles and 3 stages; 139,280 at 5)."""
    rows = pack * q_len
    block_m = min(max(16, next_power_of_2(rows)), DECODE_MAX_ROWS)
    if q_block is not None:
        block_m = min(block_m, max(16, largest_tile_dividing(pack * q_block, pack * q_block)))
    wide = max(padded_head_dim(head_dim), padded_head_dim(v_head_dim))
    if capability is None:
        block_n, warps, stages, why = 16, 4, 1, "interpreter: small key tiles keep the CPU emulation quick"
    elif dtype == torch.float32 or wide > 128:
        block_n, warps, stages, why = 32, 4, 2, "fp32 or head dim > 128: 32-key tiles fit shared memory"
    else:
        block_n, warps, stages, why = 128, 4, 3, "128-key tiles, 3 stages: K/V streamed at full bandwidth"
    waves = SPLIT_WAVES
    if block_m >= 64 and capability is not None:
        block_n, warps = min(block_n, 64), 8  # 64+ rows x 128 keys of scores with 4 warps spill
        why += f"; {block_m} rows: {block_n}-key tiles, 8 warps"
    elif block_m >= SPARSE_NARROW_ROWS and kv_block is not None and capability is not None:
        block_n, waves = min(block_n, 64), SPARSE_NARROW_WAVES
        why += f"; {block_m} rows with a block mask: {block_n}-key tiles, {waves} programs per SM"
    if kv_block is not None:
        block_n = largest_tile_dividing(kv_block, block_n)
    if page and capability is not None:
        stages += PAGED_EXTRA_STAGES
        why += f"; paged: {stages} stages (the page-table load takes stages of the pipeline)"
    reason = f"{rows} packed rows in {block_m}-row tiles; {why}"
    return DecodeTiles(block_m, block_n, warps, stages, reason, waves)


def choose_splits(
    programs: int, units: int, target: DeviceLimits, ragged: bool = False, waves: int = SPLIT_WAVES
) -> int:
    """Key splits so that ``programs * splits`` fills the GPU ``waves`` times over (at least
    ``SPLIT_FILL`` of its SMs) with a full last wave (wave efficiency >= 95%, else the most efficient
    count up to 4x that); each split at least one unit of keys. ``programs``: (sequences x head
    groups x row tiles).

    ``ragged`` (per-sequence key counts, not read on the host): the splits are cut from the padded
    length and those past a sequence's end exit at once, so ``RAGGED_SPLIT_WAVES`` makes them small
    enough that the long sequences' splits still spread over every SM."""
    sms = target.multiprocessors or INTERPRETER_SMS
    programs = max(1, programs)
    waves, fill = (RAGGED_SPLIT_WAVES, 1.0) if ragged else (waves, SPLIT_FILL)
    least = max(1, min(units, math.ceil(fill * waves * sms / programs)))

    def efficiency(splits: int) -> float:
        total = programs * splits
        return total / (-(-total // sms) * sms)

    candidates = range(least, max(least, min(units, 4 * least)) + 1)
    good = [s for s in candidates if efficiency(s) >= 0.95]
    return good[0] if good else max(candidates, key=efficiency)


@functools.lru_cache(maxsize=256)  # pure: the plan's choice and the launcher ask for the same launch
def decode_launch(
    *,
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_head_dim: int,
    dtype: torch.dtype,
    q_block: int | None,
    kv_block: int | None,
    per_head_mask: bool,
    target: DeviceLimits,
    ragged: bool = False,
    splits: int | None = None,
    tiles: DecodeTiles | None = None,
    page: int = 0,
) -> DecodeLaunch:
    """The decode kernel's launch for these shapes (``q_block``/``kv_block`` None: no block mask;
    ``ragged``: per-sequence key counts are given; ``page``: the page size of a paged cache, 0 if
    contiguous)."""
    pack = 1 if per_head_mask else q_heads // kv_heads
    if tiles is None:
        tiles = decode_tiles(
            pack=pack, q_len=q_len, head_dim=head_dim, v_head_dim=v_head_dim, dtype=dtype,
            q_block=q_block, kv_block=kv_block, capability=target.capability, page=page,
        )  # fmt: skip
    m_tiles = -(-(pack * q_len) // tiles.BLOCK_M)
    unit = kv_block if kv_block is not None else tiles.BLOCK_N
    units = max(1, -(-kv_len // unit))
    programs = batch * (q_heads // pack) * m_tiles
    if splits is None:
        splits = choose_splits(programs, units, target, ragged, tiles.waves)
    elif isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}.")
    units_per_split = -(-units // min(splits, units))
    return DecodeLaunch(tiles, pack, m_tiles, unit, -(-units // units_per_split), units_per_split)


def choose_kernel(
    *,
    q_len: int,
    kv_len: int,
    q_heads: int,
    kv_heads: int,
    positions_given: bool,
    kv_offset: int,
    needs_grad: bool,
    per_head_mask: bool,
    prefill_tiles: str | None,
    paged: bool = False,
    splits: int | None = None,
) -> KernelChoice:
    """Prefill or decode for one call; "unsupported" (with the fix) when neither kernel can take it.

    - gradients need the prefill kernels (the decode kernel has no backward), which read no Positions;
    - Positions (query offsets, ragged key lengths) are read by the decode kernel (kv_offset 0 only);
    - paged K/V caches are read through their page table by both kernels (``kv_len`` is then the
      logical length) and are chosen for as contiguous ones;
    - prefill launch knobs (explicit tiles, kernel_options BLOCK_M/BLOCK_N/num_warps/num_stages/USE_TMA/
      autotune; ``prefill_tiles`` names them) pick the prefill kernel, which they configure;
    - otherwise decode when the packed query rows (GQA group x Lq) fit one tile: each K/V byte is
      then read once per kv head, where prefill reads it once per query head. Short caches
      (Lkv < SHORT_CACHE_LEN) too, up to SHORT_CACHE_ROWS packed rows, what was measured (one launch
      either way; H200, Lq 1-4: B8 Hq32 E128 at 256 / 1k / 2k keys 1.1 / 2.1 / 2.3x faster than
      prefill, B1 H4 E64 at 256 keys 5.7 against 4.3 us of GPU time but 21 against 39-58 us of host
      time, the larger part of such a call); more rows over a short cache are a prefill-sized call
      (Lq = Lkv = 64 self-attention, say), left to the prefill kernel.
    """
    group = q_heads // kv_heads
    pack = 1 if per_head_mask else group
    rows = pack * q_len
    if kv_offset != 0:
        return KernelChoice("unsupported", f"Positions.kv_offset={kv_offset}: the Triton kernels read keys "
                            "from position 0; use kernel_options={'BACKEND': 'REFERENCE'} or kv_offset=0")  # fmt: skip
    if needs_grad and positions_given:
        return KernelChoice("unsupported", "positions are for inference (the decode kernel has no backward); "
                            "call under torch.no_grad() / inference_mode, or drop positions to train")  # fmt: skip
    if needs_grad:
        return KernelChoice("prefill", "gradients needed: the decode kernel has no backward")
    if prefill_tiles and positions_given:
        return KernelChoice("unsupported", f"{prefill_tiles} configure the prefill kernel, which reads no "
                            "positions; drop them (the decode kernel chooses its own tiles)")  # fmt: skip
    if prefill_tiles:
        return KernelChoice("prefill", f"{prefill_tiles} configure the prefill kernel")
    pages = " (K/V through the page table)" if paged else ""
    if positions_given:
        return KernelChoice("decode", f"positions (query offsets / key lengths) are read by the decode kernel"
                            f"{pages}", splits)  # fmt: skip
    if kv_len < SHORT_CACHE_LEN and rows > SHORT_CACHE_ROWS:
        return KernelChoice("prefill", f"Lkv={kv_len} < {SHORT_CACHE_LEN} with {rows} packed rows > "
                            f"{SHORT_CACHE_ROWS}: a prefill-sized call, prefill's query tiles")  # fmt: skip
    if rows <= DECODE_MAX_ROWS:
        packing = f"{pack} heads x {q_len} tokens" if pack > 1 else f"{q_len} tokens (one head per tile)"
        return KernelChoice("decode", f"{packing} = {rows} rows fit one tile: K/V read once per kv head"
                            f"{pages}", splits)  # fmt: skip
    return KernelChoice(
        "prefill", f"{rows} packed rows > {DECODE_MAX_ROWS}: prefill's query tiles fill the GPU"
    )
