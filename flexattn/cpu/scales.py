"""Constant factors of a score mod's graph gathered into one multiply (the fused CPU engine only).

The fused CPU engine runs a mod's graph op by op over whole score grids, so every op is a pass over
a grid. Constant scales make many of them: soft-capping ``c * tanh(s / c)`` differentiates to
``dout * c * (1 - t * t) / c``, five passes where three do the same math. ``fold_scales`` carries
each float32 value as ``factor * base`` with a Python float ``factor`` through

    mul(x, c), mul(c, x), truediv(x, c), neg(x)     the factor scaled, no op
    mul(x, y), truediv(x, y)                        one op on the bases, the factors combined
    add(x, y), sub(x, y) with equal factors         one op on the bases, the factor kept

and multiplies a factor in only where a value enters any other op or is an output (once per
value: the graph is hash-consed). Factors that are zero, not finite or beyond 2**±64 are never
carried (``0 * inf`` must stay nan, and a scale that overflows float32 on its own must still do
so). The results equal the graph's up to float32 rounding (a product of constants is rounded once
instead of at every step), not bit for bit: the kernels keep their own graph, whose compiler folds
constants itself.
"""

from __future__ import annotations

import math

import torch

from flexattn.compiler.ir import INPUTS, Graph, Node

_F32 = torch.float32


def fold_scales(
    graph: Graph, outputs: list[int], score_factor: float = 1.0, approx_tanh: set[int] = frozenset()
) -> tuple[Graph, list[int]]:
    """A new graph computing ``outputs`` with constant factors gathered (module docstring), and the
    new indices of ``outputs``. ``graph`` must hold no loads or searches (the fused engine's graphs).

    With ``score_factor`` c the new graph's ``score`` input is ``c * score`` (the caller scales the
    score for free, e.g. in the query it multiplies anyway), and every output is unchanged.
    ``approx_tanh``: float32 tanh nodes computed as ``2 * sigmoid(2x) - 1`` (the 2x is a factor:
    free), ~2.2x faster than torch's tanh on AVX2 CPUs, absolute error ~2e-7, so for fp16 / bf16
    inputs only (the caller's rule)."""
    folder = _Folder(graph, score_factor, approx_tanh)
    for i in graph.live(outputs):
        folder.visit(i)
    return folder.new, [folder.materialized(i) for i in outputs]


def score_factor(graph: Graph, outputs: list[int]) -> float:
    """The factor c a folded graph's every use of ``score`` multiplies it by (``mul(score, c)``), so
    that with ``score_factor=c`` the score enters with no multiply at all; 1.0 if there is none."""
    uses = {i for i in graph.live(outputs) if 0 in graph.nodes[i].args}
    if len(uses) != 1:
        return 1.0
    node = graph.nodes[uses.pop()]
    other = [a for a in node.args if a != 0]
    if node.op != "mul" or len(other) != 1 or graph.nodes[other[0]].op != "const":
        return 1.0
    factor = float(graph.nodes[other[0]].value)
    return factor if _carried(factor) else 1.0


class _Folder:
    def __init__(self, graph: Graph, score_factor: float, approx_tanh: set[int]):
        self.old, self.new, self.approx_tanh = graph, Graph(), approx_tanh
        # per old node: (new base node, factor): its value is factor * base
        self.scaled: dict[int, tuple[int, float]] = {i: (i, 1.0) for i in range(len(INPUTS))}
        self.scaled[0] = (0, 1.0 / score_factor)

    def materialized(self, i: int) -> int:
        """The new node holding old node ``i``'s value."""
        return self._times(*self.scaled[i])

    def _times(self, base: int, factor: float) -> int:
        """The new node holding ``factor * base``."""
        if abs(factor - 1.0) <= 2.0**-40:  # (1 / c) * c need not be 1.0 exactly in float64
            return base
        return self.new.add(Node("mul", (base, self.new.const(factor, _F32)), _F32))

    def visit(self, i: int) -> None:
        node = self.old.nodes[i]
        if i in self.scaled:
            return
        assert node.op not in ("load", "search"), "fold_scales: graphs with gathers are not folded"
        folded = self._fold(node) if node.dtype == _F32 else None
        if i in self.approx_tanh and node.dtype == _F32:
            folded = self._tanh(node.args[0])
        if folded is None:
            args = tuple(self.materialized(a) for a in node.args)
            folded = (self.new.add(Node(node.op, args, node.dtype, node.value)), 1.0)
        self.scaled[i] = folded

    def _fold(self, node: Node) -> tuple[int, float] | None:
        """``(base, factor)`` of a float32 node the rules cover, else None."""
        op, args = node.op, node.args
        if any(self.old.nodes[a].dtype != _F32 for a in args):
            return None
        if op == "neg":
            return self._scaled(args[0], -1.0)
        if op in ("mul", "truediv"):
            x, y = args
            cy = self._constant(y)
            if cy is not None:
                return self._scaled(x, cy if op == "mul" else 1.0 / cy)
            cx = self._constant(x)
            if op == "mul" and cx is not None:
                return self._scaled(y, cx)
            (bx, fx), (by, fy) = self.scaled[x], self.scaled[y]
            factor = fx * fy if op == "mul" else fx / fy
            return (self.new.add(Node(op, (bx, by), _F32)), factor) if _carried(factor) else None
        if op in ("add", "sub"):
            (bx, fx), (by, fy) = self.scaled[args[0]], self.scaled[args[1]]
            if fx != fy or self._constant(args[0]) is not None or self._constant(args[1]) is not None:
                return None
            return self.new.add(Node(op, (bx, by), _F32)), fx
        return None

    def _tanh(self, x: int) -> tuple[int, float] | None:
        """``2 * sigmoid(2x) - 1`` (None where 2x's factor cannot be carried: the exact tanh)."""
        base, factor = self.scaled[x]
        if not _carried(2.0 * factor):
            return None
        sigmoid = self.new.add(Node("sigmoid", (self._times(base, 2.0 * factor),), _F32))
        twice = self.new.add(Node("mul", (sigmoid, self.new.const(2.0, _F32)), _F32))
        return self.new.add(Node("sub", (twice, self.new.const(1.0, _F32)), _F32)), 1.0

    def _scaled(self, x: int, by: float) -> tuple[int, float] | None:
        base, factor = self.scaled[x]
        return (base, factor * by) if _carried(factor * by) else None

    def _constant(self, i: int) -> float | None:
        """The value of old node ``i`` if it is a float constant the rules may carry."""
        node = self.old.nodes[i]
        if node.op != "const" or not _carried(float(node.value)):
            return None
        return float(node.value)


def _carried(factor: float) -> bool:
    return factor != 0.0 and math.isfinite(factor) and 2.0**-64 <= abs(factor) <= 2.0**64
