"""Static facts about a traced graph that code generation relies on.

- ``tile_dims``: the tile axes (M = queries, N = keys) each value varies along;
- ``non_negative``: integers provably >= 0 (gathers skip the negative-index wrap);
- ``exact_nodes``: values that decide a mask bit, an index or an integer (computed like eager);
- ``capture_layouts`` / ``encode_int``: where each captured tensor sits in the argument tuple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.compiler.ir import COMPARISONS, INPUTS, Graph, capture_spec

INT_ARG_OFFSET = 2**40 + 1


def encode_int(value: int) -> int:
    """A size or stride as it travels in ``caps`` (decoded by ``triton_math.arg_i32/arg_i64``)."""
    return 2 * int(value) + INT_ARG_OFFSET


M, N = "M", "N"
_INPUT_DIMS = {"score": {M, N}, "dout": {M, N}, "q_idx": {M}, "kv_idx": {N}, "b": set(), "h": set()}


@dataclass(frozen=True)
class CaptureLayout:
    """Where captured tensor ``slot`` sits in the flat ``caps`` tuple."""

    base: int
    ndim: int
    wide: bool  # int64 offsets (the tensor or its gradient buffer may hold 2**31 elements)


def capture_layouts(graph: Graph) -> list[CaptureLayout]:
    layouts, base = [], 0
    for tensor in graph.captures:
        layouts.append(CaptureLayout(base, tensor.ndim, capture_spec(tensor, False).wide))
        base += 1 + 2 * tensor.ndim
    return layouts


def tile_dims(graph: Graph) -> list[frozenset]:
    """For each node, the tile axes (M = query rows, N = key columns) it varies along."""
    dims: list[frozenset] = []
    for node in graph.nodes:
        if node.op in _INPUT_DIMS:
            dims.append(frozenset(_INPUT_DIMS[node.op]))
        else:
            dims.append(frozenset().union(*[dims[a] for a in node.args]))
    return dims


def non_negative(graph: Graph) -> list[bool]:
    """For each integer node, whether it is provably >= 0 (lets gathers skip the negative wrap)."""
    out: list[bool] = []
    for node in graph.nodes:
        args = [out[a] for a in node.args]
        if node.op in INPUTS:
            out.append(node.op != "score")
        elif node.op == "const":
            out.append(node.value >= 0)
        elif node.op == "load":
            out.append(node.dtype in (torch.bool, torch.uint8))
        elif node.op == "search":
            out.append(True)
        elif node.op in ("add", "mul", "floordiv", "maximum", "where", "cast", "abs", "clamp_min", "rshift"):
            vals = args[1:] if node.op == "where" else args
            nonneg = all(vals) if node.op != "maximum" else any(vals)
            if node.op == "clamp_min":
                nonneg = args[1]
            out.append(nonneg and not node.dtype.is_floating_point)
        elif node.op in ("mod", "and"):
            out.append(args[1] and not node.dtype.is_floating_point)
        elif node.op == "minimum":
            out.append(all(args))
        else:
            out.append(node.dtype == torch.bool)
    return out


_DISCONTINUOUS = (
    frozenset(
        {
            "floor",
            "ceil",
            "round",
            "trunc",
            "sign",
            "signbit",
            "copysign",
            "floordiv",
            "mod",
            "fmod",
            "load",
            "search",
        }
    )
    | COMPARISONS
)


def exact_nodes(graph: Graph, output: int) -> set[int]:
    """Forward nodes whose exact (eager-identical) value matters: everything feeding a floor, a
    comparison, a gather index or an integer cast. A last-ulp difference elsewhere only perturbs the
    score smoothly; here it could flip a mask bit or a gathered row."""
    exact: set[int] = set()
    for i in range(output, -1, -1):
        node = graph.nodes[i]
        integer_cast = node.op == "cast" and not node.dtype.is_floating_point
        if i in exact or node.op in _DISCONTINUOUS or integer_cast:
            exact.update(node.args)
    return exact
