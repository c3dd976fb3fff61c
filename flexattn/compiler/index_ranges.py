"""Certain out-of-range gathers: integer ranges of index expressions over the whole index grid.

A mod is defined on every (b, h, q_idx, kv_idx) of its grid (B, H, Q_LEN, KV_LEN), masked pairs
included: PyTorch's eager flex_attention evaluates it there, and so do flexattn's reference backend
and ``create_block_mask``. An index into a captured tensor must lie in ``[-n, n)`` (negative counts
from the end, as in Python). Eager indexing raises where it does not; the kernels cannot check every
element cheaply, so the rule is enforced before any work, on every backend alike, wherever the
violation is certain from the shapes alone:

``attained_range`` follows integer index expressions built from the positions by ``+ - *`` with
constants, floor division by a positive constant, clamps and negation, over the grid's ranges,
keeping only ranges whose both ends are *attained* by some element (a sum of terms over distinct
inputs attains the sums of its ends; ``q_idx - q_idx`` would not, so a repeated input gives up).
When such a range leaves ``[-n, n)``, some element of the grid reads out of range for certain.
Indices it cannot follow (values gathered from other tensors, ``%``, ``where``) are not checked
here: the reference backend raises on them as eager PyTorch does, and the kernels clamp them
(set ``TRITON_DEBUG=1`` for a device-side assert instead; see docs/debugging.md).
"""

from __future__ import annotations

import torch

from flexattn.compiler.ir import Graph

_POSITIONS = ("b", "h", "q_idx", "kv_idx")


def attained_range(graph: Graph, i: int, sizes: dict[str, int]) -> tuple[int, int] | None:
    """(lo, hi) of integer node ``i`` over the grid with both ends attained, or None if unknown.

    ``sizes`` maps "b", "h", "q_idx", "kv_idx" to the grid's extent along each (B, H, Q_LEN, KV_LEN).
    """
    found = _range(graph, i, sizes, {})
    return None if found is None else found[:2]


def _range(graph: Graph, i: int, sizes, memo) -> tuple[int, int, frozenset] | None:
    if i in memo:
        return memo[i]
    node = graph.nodes[i]
    result = None
    if node.op in _POSITIONS:
        result = (0, sizes[node.op] - 1, frozenset([node.op]))
    elif node.op == "const" and not node.dtype.is_floating_point and node.dtype != torch.bool:
        result = (int(node.value), int(node.value), frozenset())
    elif node.dtype.is_floating_point or node.dtype == torch.bool:
        result = None
    else:
        args = [_range(graph, a, sizes, memo) for a in node.args]
        if node.args and all(a is not None for a in args):
            result = _combine(node.op, node.dtype, args)
    memo[i] = result
    return result


def _combine(op: str, dtype: torch.dtype, args) -> tuple[int, int, frozenset] | None:
    (lo, hi, support), *rest = args
    if op == "cast":
        info = torch.iinfo(dtype)
        return (lo, hi, support) if info.min <= lo and hi <= info.max else None
    if op == "neg":
        return (-hi, -lo, support)
    if len(rest) != 1:
        return None
    lo2, hi2, support2 = rest[0]
    constant = lo2 == hi2 and not support2
    if op in ("add", "sub"):
        if support & support2:  # q_idx - q_idx: the ends need not be attained together
            return None
        if op == "add":
            return (lo + lo2, hi + hi2, support | support2)
        return (lo - hi2, hi - lo2, support | support2)
    if op == "mul" and (constant or (lo == hi and not support)):
        if not constant:
            (lo, hi, support), (lo2, hi2) = rest[0], (lo, hi)
        ends = (lo * lo2, hi * lo2)
        return (min(ends), max(ends), support)
    if op == "floordiv" and constant and lo2 > 0:
        return (lo // lo2, hi // lo2, support)
    if op in ("clamp_min", "maximum") and constant:
        return (max(lo, lo2), max(hi, lo2), support)
    if op in ("clamp_max", "minimum") and constant:
        return (min(lo, lo2), min(hi, lo2), support)
    return None
