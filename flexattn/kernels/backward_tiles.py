"""Tile sizes, launch parameters and the dQ strategy of the backward kernels: one small pure function.

The dK/dV kernel keeps a ``[BLOCK_N1, E]`` and a ``[BLOCK_N1, Ev]`` fp32 accumulator in registers and
streams ``BLOCK_M1`` query rows at a time; the dQ kernel keeps ``[BLOCK_M2, E]`` and streams
``BLOCK_N2`` keys. Every tile must divide the BlockMask's block of its axis (kernels visit the
sub-tiles of each listed block) and be a power of two >= 16 (``tl.dot``'s minimum).

dQ strategies (``dq_mode``):
    "separate"  (default) a second kernel per query block recomputes P and dP (7 matmuls per tile
                pair in all); no atomics, so dQ is bitwise reproducible. Always used with
                ``deterministic``. Measured on the H100 (BENCHMARKS.md).
    "atomic"    the dK/dV kernel also computes dS K and adds it to an fp32 dQ buffer with
                per-element atomics (5 matmuls; the dQ summation order varies run to run).
                Correct (tested); slower than "separate" on the H100 (the extra product pushes the
                dK/dV kernel into spills; BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.options import DEFAULT_OPTIONS, KernelOptions

DQ_MODES = ("separate", "atomic")


@dataclass(frozen=True)
class BackwardTiles:
    """Tile sizes of both backward kernels, the dQ strategy, and why they were chosen."""

    BLOCK_M1: int  # dK/dV kernel: query rows per step
    BLOCK_N1: int  # dK/dV kernel: keys per program
    BLOCK_M2: int  # dQ kernel: query rows per program
    BLOCK_N2: int  # dQ kernel: keys per step
    num_warps: int
    num_stages: int
    dq_mode: str
    reason: str
    use_tma: bool = False  # Q/dO (dK/dV kernel) and K/V (dQ kernel) through Hopper tensor descriptors
    max_registers: int | None = None  # per-thread register cap of the dK/dV kernel (more programs per SM)


def choose_backward_tiles(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    q_block: int,
    kv_block: int,
    capability: tuple[int, int] | None,
    options: KernelOptions | None,
    dq_mode: str | None = None,
    light_score: bool = False,
) -> BackwardTiles:
    """Pick backward tiles for head dims ``(E, Ev)``, ``dtype`` and BlockMask blocks ``(q_block, kv_block)``.

    ``capability`` is the CUDA compute capability, or None for Triton's interpreter.
    User options (a ``KernelOptions`` or None; ``bwd_BLOCK_M1`` ... ``bwd_num_stages``, ``USE_TMA``)
    override the defaults field by field;
    ``dq_mode`` (one of DQ_MODES) overrides the dQ strategy except under ``options.deterministic``.
    ``light_score``: the score mod is a few cheap operations (``KernelMod.light``): its gradient needs
    few registers of its own.
    Example: ``choose_backward_tiles(128, 128, torch.bfloat16, 128, 128, (9, 0), KernelOptions())``.
    """
    options = DEFAULT_OPTIONS if options is None else options
    d = max(head_dim, head_dim_v)
    use_tma, max_registers = False, None
    if capability is None:
        # Triton's interpreter runs one program at a time on numpy: big tiles, few programs.
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 1
        reason = "interpreter: large tiles, few programs"
    elif dtype == torch.float32:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
        reason = "fp32: operands twice as large, small tiles"
    elif d <= 128 and capability[0] >= 9:
        m1, n1, m2, n2, warps, stages, use_tma = 64, 64, 64, 64, 4, 2, True
        reason = (f"Hopper, head dim {d} <= 128: 64x64 tiles, 4 warps, 2 stages (two programs per SM), Q/dO "
                  "and K/V through TMA (fastest of the sweep in BENCHMARKS.md)")  # fmt: skip
        # three dK/dV programs per SM: +4-13% (noop, causal, alibi); soft-cap spills under the cap
        if d <= 64 and light_score:
            max_registers, reason = 168, reason + "; dK/dV capped at 168 registers: three programs per SM"
    elif d <= 64:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 3
        reason = f"head dim {d} <= 64: 64-key programs, 4 warps"
    elif d <= 128:
        m1, n1, m2, n2, warps, stages = 64, 128, 128, 64, 8, 2
        reason = f"head dim {d} <= 128: 128-key programs, 8 warps"
    else:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
        reason = f"head dim {d} > 128: small tiles keep the accumulators in registers"
    user_tiles = (
        "bwd_BLOCK_M1",
        "bwd_BLOCK_N1",
        "bwd_BLOCK_M2",
        "bwd_BLOCK_N2",
        "bwd_num_warps",
        "bwd_num_stages",
    )
    if any(getattr(options, name) for name in user_tiles):
        max_registers = None  # the cap was measured for the default tiles only
    m1 = options.bwd_BLOCK_M1 or min(m1, q_block)
    n1 = options.bwd_BLOCK_N1 or min(n1, kv_block)
    m2 = options.bwd_BLOCK_M2 or min(m2, q_block)
    n2 = options.bwd_BLOCK_N2 or min(n2, kv_block)
    for name, tile, block in (
        ("bwd_BLOCK_M1", m1, q_block),
        ("bwd_BLOCK_N1", n1, kv_block),
        ("bwd_BLOCK_M2", m2, q_block),
        ("bwd_BLOCK_N2", n2, kv_block),
    ):
        if block % tile:
            raise ValueError(
                f"kernel_options['{name}']={tile} must divide the BlockMask's block size {block}; "
                f"pick a power of two <= {block}."
            )
    mode = dq_mode or "separate"
    if mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}.")
    if options.deterministic:
        mode, reason = "separate", reason + "; deterministic: dQ without atomics"
    if options.USE_TMA and not use_tma:
        use_tma, reason = True, reason + "; Q/dO and K/V through tensor descriptors (USE_TMA)"
    return BackwardTiles(
        m1,
        n1,
        m2,
        n2,
        options.bwd_num_warps or warps,
        options.bwd_num_stages or stages,
        mode,
        reason,
        use_tma=use_tma,
        max_registers=max_registers,
    )
