"""Run-time tables of the interval functions (``intervals.py``): sparse min/max tables of the
captured tensors a mask mod gathers from, built on the tensors' device for each call (no host sync).

A sparse table answers "min and max of row r over positions [lo, hi]" with two overlapping
power-of-two windows (``interval_math.range_min_max``). Positions are grouped in *grains*: rows up
to SMALL_TABLE long are tabled per position (exact for any range), longer ones per grain of the
block sizes (exact for ranges made of whole tiles, a sound superset otherwise).
"""

from __future__ import annotations

import functools

import torch

from flexattn.compiler.analysis import encode_int
from flexattn.compiler.intervals import IntervalPlan


def range_table(rows: torch.Tensor, grain: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse min/max tables over the grains of each row (2 + 2 * levels device ops, no host sync).

    Args:
        rows: integer, bool or float32 tensor (R, n).
        grain: positions per grain (>= 1).
    Returns:
        tmin, tmax: int64 (float32 for floats) (levels, R, nb), nb = ceil(n / grain): entry (k, r, i),
            for i <= nb - 2**k, is the min / max of row r over grains i .. i + 2**k - 1. Entries past
            nb - 2**k are never read by a query (``interval_math.range_min_max``) and left unset.
        lg: int64 (nb + 1,): floor(log2(c)) for c >= 1 (the level of a c-grain query).
    """
    R, n = rows.shape
    nb = -(-n // grain)
    dtype = torch.float32 if rows.is_floating_point() else torch.int64
    x = rows.to(dtype)
    if nb * grain != n:
        x = torch.cat([x, x[:, -1:].expand(R, nb * grain - n)], dim=1)
    x = x.view(R, nb, grain)
    levels = nb.bit_length()
    tmin = torch.empty(levels, R, nb, dtype=dtype, device=rows.device)
    tmax = torch.empty_like(tmin)
    torch.amin(x, -1, out=tmin[0])
    torch.amax(x, -1, out=tmax[0])
    for k in range(1, levels):
        w, valid = 1 << (k - 1), nb - (1 << k) + 1
        torch.minimum(tmin[k - 1, :, :valid], tmin[k - 1, :, w : w + valid], out=tmin[k, :, :valid])
        torch.maximum(tmax[k - 1, :, :valid], tmax[k - 1, :, w : w + valid], out=tmax[k, :, :valid])
    return tmin, tmax, _log2_table(nb, rows.device)


@functools.lru_cache(maxsize=64)
def _log2_table(nb: int, device: torch.device) -> torch.Tensor:
    """int64 (nb + 1,): floor(log2(max(c, 1))) (read-only; shared by every table of nb grains)."""
    counts = torch.arange(nb + 1, device=device).clamp(min=1).to(torch.float64)
    return (torch.frexp(counts).exponent - 1).to(torch.int64)


SMALL_TABLE = 1 << 13  # rows this long are tabled per position (exact for any index range)
MAX_TABLE = 1 << 16  # grains per row at most (bounds the memory for very long rows)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def table_grain(n: int, grain: int) -> int:
    """Positions per grain for a row of ``n``: 1 for short rows (small tables like per-document
    offsets stay exact), up to ``grain`` for long ones, more only beyond MAX_TABLE grains."""
    g = min(grain, _pow2_at_least(-(-n // SMALL_TABLE)))
    return max(g, _pow2_at_least(-(-n // MAX_TABLE)))


def range_args(plan: IntervalPlan, captures: list[torch.Tensor], grain: int) -> tuple:
    """The ``ranges`` tuple of an interval function: per global slot a 2-element int64 (min, max)
    tensor, per table (tmin, tmax, lg, rows, blocks, grain) with the ints encoded. ``grain``: the
    coarsest grain wanted for long rows (``table_grain``)."""
    args: list = []
    for slot in plan.global_slots:
        t = captures[slot].detach()
        flat = t.reshape(-1).to(torch.float32 if t.is_floating_point() else torch.int64)
        args.append(torch.stack([flat.min(), flat.max()]))
    for spec in plan.tables:
        t = captures[spec.slot].detach()
        n = t.shape[spec.dim]
        rows = t.movedim(spec.dim, -1).reshape(-1, n)
        g = table_grain(n, grain)
        tmin, tmax, lg = range_table(rows, g)
        args += [tmin, tmax, lg, *map(encode_int, (rows.shape[0], tmin.shape[-1], g))]
    return tuple(args)
