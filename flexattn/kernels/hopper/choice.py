"""Which prefill forward runs a call on a Hopper GPU: the Gluon warp-specialized kernel or the Triton one.

A small pure function that says why (:func:`choose_prefill_forward`), and the Gluon kernel's launch
configuration (:class:`HopperTiles`, :func:`hopper_tiles`). Imports neither Triton nor Gluon, so the
plan can ask before anything Hopper-specific is loaded.

``kernel_options={"PREFILL_KERNEL": ...}`` steers it: None (the default, :func:`default_wants_gluon`:
the Gluon kernel where it can run for head dim 128 and over paged K/V caches, else the Triton
kernel), "TRITON" (always the Triton kernel), "GLUON" (the Gluon kernel, or an error naming what it
lacks), "AUTO" (the Gluon kernel wherever it can run, else the Triton kernel, with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.kernels.device import DeviceLimits

PREFILL_KERNELS = ("TRITON", "GLUON", "AUTO")
HEAD_DIMS = (64, 128)  # head dims the Gluon kernel is written (and register-budgeted) for
CONSUMER_ROWS = 64  # query rows of one consumer warpgroup (wgmma's M)
BLOCK_N = 128  # keys per K/V tile
# (score_mod fn, mask_mod fn) -> why they did not compile into the Gluon kernel: filled by the plan
# when PREFILL_KERNEL='AUTO' tried (the choice then falls back to the Triton forward with that reason)
INLINE_FAILURES: dict[tuple, str] = {}


@dataclass(frozen=True)
class HopperTiles:
    """One launch configuration of the Gluon forward (``flexattn/kernels/hopper/forward_ws.py``).

    A CTA holds ``consumers`` warpgroups of ``block_m`` query rows each (``cta_rows`` in all) and one
    producer warp; K/V tiles of ``block_n`` keys stream through a ring of ``stages`` buffers.
    ``pingpong``: the consumers take turns issuing their GEMMs. ``v_fence``: wait for the next V tile
    right after the softmax (keeps ptxas from hoisting the P V wait above the exponentials).
    ``consumer_regs`` / ``producer_regs``: setmaxnreg per thread."""

    block_m: int
    block_n: int
    stages: int
    consumers: int
    pingpong: bool
    v_fence: bool = True
    consumer_regs: int = 0  # 0: 240 with two consumers, 160 with three
    producer_regs: int = 24
    reason: str = ""

    @property
    def cta_rows(self) -> int:
        return self.consumers * self.block_m

    @property
    def registers(self) -> int:
        return self.consumer_regs or {2: 240, 3: 160}[self.consumers]


@dataclass(frozen=True)
class PrefillForward:
    """``kind``: "gluon", "triton" or "unsupported" (forced Gluon that cannot run: ``reason`` says why)."""

    kind: str
    reason: str
    tiles: HopperTiles | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def hopper_tiles(*, head_dim: int, q_block: int | None, tail: bool = False) -> HopperTiles:
    """The Gluon kernel's tiles: a CTA covers exactly one q block of the mask (``q_block`` rows:
    128 -> two consumer warpgroups of 64 rows, 192 -> three), so it reads one row of the block tables;
    without a block mask (``q_block`` None) the fastest measured shape per head dim (H200, 2026-12-02,
    B4 H16 bf16: E128 two consumers, two stages, no ping-pong, 617-620 TFLOP/s noop; E64 three
    consumers, two stages, ping-pong, 512). ``tail``: a length is not a multiple of 128; three
    consumers (160 registers each) then spill in the tail path (sm_90a compile), so E64 takes two."""
    if q_block is None:
        if head_dim == 64 and not tail:
            return HopperTiles(
                64, BLOCK_N, 2, 3, True, reason="no block mask, E64: 3 consumers x 64 rows, ping-pong"
            )
        return HopperTiles(64, BLOCK_N, 2, 2, False, reason="no block mask: 2 consumers x 64 rows")
    consumers = q_block // CONSUMER_ROWS
    pingpong = head_dim == 64
    return HopperTiles(
        CONSUMER_ROWS, BLOCK_N, 2, consumers, pingpong,
        reason=f"one {q_block}-row q block per CTA: {consumers} consumers x {CONSUMER_ROWS} rows"
        + (", ping-pong" if pingpong else ""),
    )  # fmt: skip


def default_wants_gluon(head_dim: int, v_head_dim: int, page: int) -> str | None:
    """Why the default (PREFILL_KERNEL None) asks for the Gluon forward, or None: then it runs the
    Triton forward. Measured on the H200 (BENCHMARKS.md): at E128 the Gluon forward is 1.13-1.33x
    the Triton one for every variant of the paper; over pages it copies whole pages by TMA where the
    Triton forward gathers the rows of pages smaller than its key tiles one by one. At E64 it is
    faster without a mask but 5-7% slower with sliding-window and document masks."""
    if page:
        return f"paged K/V, {page}-row pages copied whole by TMA"
    if head_dim == 128 and v_head_dim == 128:
        return "E128, where it is faster than the Triton forward for every measured variant"
    return None


def choose_prefill_forward(
    *,
    requested: str | None,
    target: DeviceLimits,
    dtype: torch.dtype,
    head_dim: int,
    v_head_dim: int,
    q_block: int,
    kv_block: int,
    dense: bool,
    scale: float,
    page: int = 0,
    tma_ok: bool = True,
    other_knobs: str | None = None,
    inline_failure: str | None = None,
    tail: bool = False,
) -> PrefillForward:
    """The Gluon forward or the Triton forward for one prefill call, and why.

    ``requested``: the PREFILL_KERNEL option (None: the default, see the module docstring).
    ``dense``: no block mask (every key visited, no tables read). ``page``: the page size of a paged
    K/V cache, 0 for contiguous K/V. ``tma_ok``: q, k, v can be described for TMA (unit feature stride, 16-byte aligned base
    and strides). ``other_knobs``: what else configures the Triton kernel (tiles, BLOCK_M, ...).
    ``inline_failure``: why the Gluon kernel failed to compile these mods before (or None).
    ``tail``: Lq or Lkv is not a multiple of 128 (see :func:`hopper_tiles`).
    """
    if requested is not None and requested not in PREFILL_KERNELS:
        raise ValueError(f"PREFILL_KERNEL must be None or one of {PREFILL_KERNELS}, got {requested!r}.")
    if requested == "TRITON":
        return PrefillForward("triton", "kernel_options PREFILL_KERNEL='TRITON'")
    wanted = default_wants_gluon(head_dim, v_head_dim, page) if requested is None else None
    if requested is None and wanted is None:
        hint = " (PREFILL_KERNEL='AUTO' asks for the Gluon one)" if target.capability == (9, 0) else ""
        return PrefillForward("triton", f"the default prefill forward at E={head_dim}{hint}")
    lacks = _gluon_lacks(target, dtype, head_dim, v_head_dim, q_block, kv_block, dense, scale, page, tma_ok,
                         other_knobs, inline_failure)  # fmt: skip
    if lacks is None:
        tiles = hopper_tiles(head_dim=head_dim, q_block=None if dense else q_block, tail=tail)
        why = f"sm_90 warp-specialized Gluon forward ({tiles.reason})"
        if requested is None:
            why = f"{wanted}: {why}"
        return PrefillForward("gluon", why, tiles)
    if requested == "GLUON":
        return PrefillForward("unsupported", f"kernel_options PREFILL_KERNEL='GLUON' but {lacks}")
    return PrefillForward("triton", lacks)


def _gluon_lacks(target, dtype, head_dim, v_head_dim, q_block, kv_block, dense, scale, page, tma_ok,
                 other_knobs, inline_failure) -> str | None:  # fmt: skip
    """What keeps the Gluon kernel from this call (with the fix), or None."""
    if target.capability != (9, 0):
        arch = "no GPU" if target.capability is None else "sm_{}{}".format(*target.capability)
        return f"the Gluon forward is written for sm_90 (H100/H200); the target is {arch}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the Gluon forward takes fp16/bf16 inputs; got {dtype}"
    if head_dim not in HEAD_DIMS or v_head_dim != head_dim:
        return f"the Gluon forward takes E = Ev in {HEAD_DIMS}; got E={head_dim}, Ev={v_head_dim}"
    if page and BLOCK_N % page and page % BLOCK_N:
        return (
            f"the Gluon forward reads pages whose size divides its {BLOCK_N}-key tiles or is a multiple "
            f"of them; got page_size={page}"
        )
    if other_knobs:
        return f"{other_knobs} configure the Triton forward"
    if not tma_ok:
        return "q, k, v need unit feature stride and 16-byte aligned base and strides for TMA"
    if not scale > 0:
        return f"the Gluon forward keeps the row max in scaled units and needs scale > 0; got {scale}"
    if not dense and q_block not in (2 * CONSUMER_ROWS, 3 * CONSUMER_ROWS):
        return f"the Gluon forward covers one q block per CTA: Q_BLOCK must be 128 or 192, got {q_block}"
    if not dense and kv_block % BLOCK_N:
        return f"the Gluon forward reads {BLOCK_N}-key tiles: KV_BLOCK must be a multiple of {BLOCK_N}, got {kv_block}"
    if inline_failure:
        return f"the mods do not compile into the Gluon kernel ({inline_failure})"
    return None
