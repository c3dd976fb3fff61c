"""Diagonal gathers: loads whose index is ``±(kv_idx - q_idx) + c`` (relative-position tables).

On a tile of raw positions ``q_lo + i``, ``kv_lo + j`` such an index is ``d0 + sign * (j - i)``:
a scalar per tile plus a pattern that is the same on every tile (a Toeplitz matrix): the tile
touches only BLOCK_M + BLOCK_N - 1 entries. Code generation (``lowering.Emitter`` with
``tile_origin``, the TILE_GRAD_FN of ``kernels/mods.py``) sums the gradient per diagonal before one
atomic add per distinct entry whenever the tile's whole index range lies inside the table (the
wrap and clamp of a gather are then identities); other tiles take the element-wise atomics.

A load qualifies when exactly one of its indices is diagonal, every other index is the same for
the whole tile (depends on ``b``, ``h``, constants or such gathers only), the indices are int32
and the tensor is not wide (int32 offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.compiler.analysis import M, N, capture_layouts, tile_dims
from flexattn.compiler.ir import Graph


@dataclass(frozen=True)
class Diagonal:
    """Index ``dim`` of a load is ``sign * (kv_idx - q_idx) + sum(c * node for c, node in rest)``.

    ``rest`` holds tile-invariant int32 nodes with coefficients +1 / -1 (constants included)."""

    dim: int
    sign: int
    rest: tuple[tuple[int, int], ...]


def _linear(graph: Graph, dims: list[frozenset], node: int, coef: int, terms: dict, rest: list) -> bool:
    """Accumulate ``coef * node`` as q/kv coefficients (``terms``) plus tile-invariant ``rest``."""
    n = graph.nodes[node]
    if n.dtype != torch.int32:
        return False
    if not dims[node]:
        rest.append((coef, node))
        return True
    if n.op in ("q_idx", "kv_idx"):
        terms[n.op] = terms.get(n.op, 0) + coef
        return True
    if n.op == "add":
        return all(_linear(graph, dims, a, coef, terms, rest) for a in n.args)
    if n.op == "sub":
        a, b = n.args
        return _linear(graph, dims, a, coef, terms, rest) and _linear(graph, dims, b, -coef, terms, rest)
    if n.op == "neg":
        return _linear(graph, dims, n.args[0], -coef, terms, rest)
    return False


def diagonal_index(graph: Graph, node: int, dims: list[frozenset] | None = None) -> tuple[int, tuple] | None:
    """``(sign, rest)`` when ``node`` is ``sign * (kv_idx - q_idx) + rest``, else None."""
    dims = tile_dims(graph) if dims is None else dims
    if dims[node] != {M, N}:
        return None
    terms: dict[str, int] = {}
    rest: list[tuple[int, int]] = []
    if not _linear(graph, dims, node, 1, terms, rest):
        return None
    kv, q = terms.get("kv_idx", 0), terms.get("q_idx", 0)
    if abs(kv) != 1 or q != -kv:
        return None
    return kv, tuple(rest)


def diagonal_loads(graph: Graph, nodes) -> dict[int, Diagonal]:
    """The diagonal gathers among ``nodes`` (load node -> its ``Diagonal``)."""
    dims = tile_dims(graph)
    layouts = capture_layouts(graph)
    found: dict[int, Diagonal] = {}
    for i in nodes:
        node = graph.nodes[i]
        if node.op != "load" or layouts[node.value].wide or dims[i] != {M, N}:
            continue
        varying = [d for d, a in enumerate(node.args) if dims[a]]
        if len(varying) != 1:
            continue
        match = diagonal_index(graph, node.args[varying[0]], dims)
        if match is not None:
            found[i] = Diagonal(varying[0], match[0], match[1])
    return found
