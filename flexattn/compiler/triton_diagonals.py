"""``@triton.jit`` helpers for diagonal gathers (``td.<name>`` in generated code; compiler/diagonals.py).

A tile holds the raw positions ``q_lo + i`` and ``kv_lo + j``; ``q_idx`` and ``kv_idx`` come shaped
``[X, 1]`` / ``[1, Y]`` in either orientation (the dK/dV kernel's tiles are transposed), and only
their shapes are read here. A diagonal index is ``d0 + SIGN * (j - i)``.
"""

import triton
import triton.language as tl


@triton.jit
def in_range(d0, size, q_idx, kv_idx, SIGN: tl.constexpr):
    """Whether ``d0 + SIGN * (j - i)`` lies in [0, size) for every pair of the tile (int64 bounds)."""
    NQ: tl.constexpr = q_idx.shape[0] * q_idx.shape[1]
    NK: tl.constexpr = kv_idx.shape[0] * kv_idx.shape[1]
    d = d0.to(tl.int64)
    if SIGN > 0:
        ok = (d >= NQ - 1) & (d + (NK - 1) < size)
    else:
        ok = (d >= NK - 1) & (d + (NQ - 1) < size)
    return ok


@triton.jit
def add_diagonals(ptr, stride, d0, val, q_idx, kv_idx, SIGN: tl.constexpr):
    """Atomically add ``val`` ([X, Y], fp32) summed per diagonal: ``ptr[(d0 + SIGN * (j - i)) * stride]``
    receives the sum over the tile's pairs on that diagonal, one atomic per distinct entry.

    Every entry must lie inside the tensor (``in_range``). The sums run in chunks of C = X diagonals
    (smaller chunks spilled more on sm_90a): chunk c gathers ``val[x, y]`` with ``x - y = t`` into row
    ``t + Y - 1 - c * C``
    (``tl.gather`` along axis 0), sums the rows and adds C entries. A fixed order: with an int64
    (fixed-point) buffer the result is bitwise reproducible."""
    X: tl.constexpr = val.shape[0]
    Y: tl.constexpr = val.shape[1]
    C: tl.constexpr = X
    CHUNKS: tl.constexpr = (X + Y - 1 + C - 1) // C
    rows = tl.arange(0, C)
    cols = tl.arange(0, Y)[None, :]
    for c in tl.static_range(CHUNKS):
        r = c * C + rows  # r = t + Y - 1 for the diagonal t = x - y
        x = r[:, None] + cols - (Y - 1)
        inside = (x >= 0) & (x < X)
        gathered = tl.gather(val, tl.minimum(tl.maximum(x, 0), X - 1), 0)
        sums = tl.sum(tl.where(inside, gathered, 0.0), 1)
        t = r - (Y - 1)
        if q_idx.shape[0] == 1:  # keys along axis 0: j - i = x - y = t
            entry = d0 + SIGN * t
        else:  # queries along axis 0: j - i = y - x = -t
            entry = d0 - SIGN * t
        tl.atomic_add(ptr + entry * stride, sums, mask=r < X + Y - 1, sem="relaxed")
