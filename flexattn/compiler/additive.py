"""Additive score mods in base 2: ``score + f(b, h, q_idx, kv_idx)`` folds into the kernels' exp2.

The kernels compute the softmax in base 2, ``p = exp2(m * log2(e) - lse2)``. For the identity score
mod they fold the scale into that one multiplier. A score mod that only adds a term independent of
the score (ALiBi, relative-position and table biases, learned per-head biases) folds the same way::

    m2 = qk * (scale * log2(e)) + BIAS_FN(b, h, q_idx, kv_idx)        # one FMA per score

``BIAS_FN`` is generated from ``f * log2(e)`` with the constant pushed to the cheapest operand: into
the factor of a product that varies along fewer tile axes, and through sums of row and column
vectors, so ALiBi's ``slope[h] * (kv_idx - q_idx)`` becomes ``(slope[h] * log2e) * kv_idx -
(slope[h] * log2e) * q_idx``: one subtraction per score instead of a subtraction, two multiplies
and an add (SASS of the backward loops in BENCHMARKS.md).

Unlike ``rewrite.py`` this changes rounding: the biased score carries a few fp32 ulp more error,
far below the rounding of fp16/bf16 scores and of the order of the kernels' own exp2 error in fp32
(the tests compare against float64 with the usual tolerance rule). The reference backend and
``create_block_mask`` evaluate the mod as written; the gradient code is generated from the mod as
written too (an additive mod's dscore is dout itself).
"""

from __future__ import annotations

import math

import torch

from flexattn.compiler.analysis import M, N, tile_dims
from flexattn.compiler.ir import Graph, Node

LOG2E = 1.0 / math.log(2.0)
_SCORE = 0  # the "score" input is node 0 of every graph (ir.INPUTS)
_TILE = frozenset({M, N})


def additive_term(graph: Graph, output: int) -> int | None:
    """The node ``f`` when the score mod's output is ``score + f`` with ``f`` independent of the score."""
    node = graph.nodes[output]
    if node.op != "add" or node.dtype != torch.float32 or graph.nodes[_SCORE].op != "score":
        return None
    a, b = node.args
    for score, term in ((a, b), (b, a)):
        if score == _SCORE and _SCORE not in graph.live([term]):
            return term
    return None


def base2_bias(graph: Graph, term: int) -> int:
    """Append to ``graph`` (a private copy: ``Graph.copy``) the nodes of ``term * log2(e)`` in float32."""
    term = graph.cast(term, torch.float32)
    return _times(graph, tile_dims(graph), term, graph.const(LOG2E, torch.float32))


def _times(graph: Graph, dims: list[frozenset], node: int, factor: int) -> int:
    """``node * factor``, where ``factor`` varies along no more tile axes than any operand it meets."""
    n = graph.nodes[node]
    if n.dtype == torch.float32 and n.op == "mul":
        x, y = n.args
        if dims[x] < dims[y]:  # fold the factor into the smaller operand, then carry it into the larger
            return _times(graph, dims, y, _mul(graph, x, factor))
        if dims[y] < dims[x]:
            return _times(graph, dims, x, _mul(graph, y, factor))
    if n.dtype == torch.float32 and n.op in ("add", "sub") and dims[node] == _TILE:
        u, v = n.args
        if dims[u] != _TILE and dims[v] != _TILE:  # a sum of a row and a column vector: scale the vectors
            return graph.add(Node(n.op, (_mul(graph, u, factor), _mul(graph, v, factor)), torch.float32))
    if n.dtype == torch.float32 and n.op == "neg":
        return graph.add(Node("neg", (_times(graph, dims, n.args[0], factor),), torch.float32))
    return _mul(graph, node, factor)


def _mul(graph: Graph, x: int, y: int) -> int:
    return graph.add(Node("mul", (graph.cast(x, torch.float32), graph.cast(y, torch.float32)), torch.float32))
