"""IR rewrites that make the generated code cheaper without changing a single bit of its values.

Runs between tracing and code generation (``flexattn.compiler._program``), so the cache key,
``explain`` and the gradient all see the rewritten graph.

In the kernels ``q_idx`` is a [BLOCK_M, 1] column and ``kv_idx`` a [1, BLOCK_N] row (``b``, ``h``
scalars), so an op whose operands depend on one of them runs on a vector and an op combining both
runs on the whole BLOCK_M x BLOCK_N tile. ``hoist_index_casts`` moves the int -> float32
conversion (slow on GPUs) of a position difference from the tile onto the vectors::

    cast(sub(kv_idx, q_idx)) -> float32    =>    sub(cast(kv_idx), cast(q_idx))    (float32)

which is what ALiBi-style biases (``slope[h] * (kv_idx - q_idx)``) trace to.
"""

from __future__ import annotations

import torch

from flexattn.compiler.analysis import M, N, tile_dims
from flexattn.compiler.ir import Graph, Node

# Exactness: if int32 ``a`` and ``b`` are exact in float32 (|a|, |b| <= 2**24), then float32
# ``cast(a) - cast(b)`` and ``cast(a - b)`` are both the exact a - b rounded to nearest: equal
# bit for bit (for ``add`` likewise). The rewrite takes only operands that are a position, possibly
# plus or minus a constant of at most _MAX_OFFSET, so it is exact for sequences shorter than
# 2**24 - 2**20 (about 15.7M positions); longer sequences are far beyond what the kernels target.
# Anything else (products, b/h, gathered values, large constants) is left alone.
_MAX_OFFSET = 2**20
_POSITIONS = ("q_idx", "kv_idx")


def hoist_index_casts(graph: Graph, outputs: list[int]) -> tuple[Graph, list[int]]:
    """``graph`` with every float32 cast of a tile-wide add/sub of positions computed on vectors.

    Returns the graph unchanged when there is nothing to rewrite, else a rewritten, pruned copy
    and the new indices of ``outputs``.
    """
    if not any(_hoistable(graph, tile_dims(graph), i) for i in graph.live(outputs)):
        return graph, outputs
    graph, outputs = graph.pruned(outputs)  # a private copy to append the new nodes to
    dims = tile_dims(graph)
    remap = list(range(len(graph)))
    for i, node in enumerate(list(graph.nodes)):
        args = tuple(remap[a] for a in node.args)
        if _hoistable(graph, dims, i):
            inner = graph.nodes[node.args[0]]
            x, y = (graph.cast(a, node.dtype) for a in inner.args)
            remap[i] = graph.add(Node(inner.op, (x, y), node.dtype))
        elif args != node.args:
            remap[i] = graph.add(Node(node.op, args, node.dtype, node.value))
    return graph.pruned([remap[o] for o in outputs])


def _hoistable(graph: Graph, dims: list[frozenset], i: int) -> bool:
    """Whether node ``i`` is cast(add/sub(position, position)) -> float32 over the whole tile."""
    node = graph.nodes[i]
    if node.op != "cast" or node.dtype != torch.float32:
        return False
    (inner_index,) = node.args
    inner = graph.nodes[inner_index]
    if inner.op not in ("add", "sub") or inner.dtype != torch.int32 or dims[inner_index] != {M, N}:
        return False  # not an add/sub, or already a vector: nothing to gain
    return all(_is_position(graph, a) for a in inner.args)


def _is_position(graph: Graph, i: int) -> bool:
    """``q_idx`` or ``kv_idx``, possibly plus or minus an int32 constant of at most _MAX_OFFSET."""
    node = graph.nodes[i]
    if node.op in _POSITIONS:
        return True
    if node.op not in ("add", "sub") or node.dtype != torch.int32:
        return False
    x, c = (graph.nodes[a] for a in node.args)
    if node.op == "add" and x.op == "const":
        x, c = c, x
    return x.op in _POSITIONS and c.op == "const" and c.dtype == torch.int32 and abs(c.value) <= _MAX_OFFSET
