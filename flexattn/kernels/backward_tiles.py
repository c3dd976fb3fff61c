"""Tile sizes and launch parameters for the backward kernels: one small pure function.

The dK/dV kernel keeps a ``[BLOCK_N1, E]`` and a ``[BLOCK_N1, Ev]`` fp32 accumulator in registers and
streams ``BLOCK_M1`` query rows at a time; the dQ kernel keeps ``[BLOCK_M2, E]`` and streams
``BLOCK_N2`` keys. Every tile must divide the BlockMask's block of its axis (kernels visit the
sub-tiles of each listed block) and be a power of two >= 16 (``tl.dot``'s minimum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BackwardTiles:
    """Tile sizes of both backward kernels and why they were chosen."""

    BLOCK_M1: int  # dK/dV kernel: query rows per step
    BLOCK_N1: int  # dK/dV kernel: keys per program
    BLOCK_M2: int  # dQ kernel: query rows per program
    BLOCK_N2: int  # dQ kernel: keys per step
    num_warps: int
    num_stages: int
    reason: str


def choose_backward_tiles(
    head_dim: int, head_dim_v: int, dtype: torch.dtype, q_block: int, kv_block: int, on_gpu: bool, options
) -> BackwardTiles:
    """Pick backward tiles for head dims ``(E, Ev)``, ``dtype`` and BlockMask blocks ``(q_block, kv_block)``.

    User options (``bwd_BLOCK_M1`` ... ``bwd_num_stages``) override the defaults field by field.
    Example: ``choose_backward_tiles(128, 128, torch.bfloat16, 128, 128, True, KernelOptions())``.
    """
    d = max(head_dim, head_dim_v)
    if not on_gpu:
        # Triton's interpreter runs one program at a time on numpy: big tiles, few programs.
        m1, n1, m2, n2, warps, stages = 64, 64, 64, 64, 4, 1
        reason = "interpreter: large tiles, few programs"
    elif dtype == torch.float32:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
        reason = "fp32: operands twice as large, small tiles"
    elif d <= 64:
        m1, n1, m2, n2, warps, stages = 64, 128, 128, 64, 8, 3
        reason = f"head dim {d} <= 64: 128-wide accumulators fit"
    elif d <= 128:
        m1, n1, m2, n2, warps, stages = 64, 128, 128, 64, 8, 2
        reason = f"head dim {d} <= 128: 128-wide accumulators, 2 stages for shared memory"
    else:
        m1, n1, m2, n2, warps, stages = 32, 64, 64, 32, 4, 1
        reason = f"head dim {d} > 128: small tiles keep the accumulators in registers"
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
    return BackwardTiles(
        m1, n1, m2, n2, options.bwd_num_warps or warps, options.bwd_num_stages or stages, reason
    )
