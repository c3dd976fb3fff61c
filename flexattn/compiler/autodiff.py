"""Reverse-mode differentiation of a traced score mod, as new IR nodes in the same graph.

Seeded with ``dout`` (dLoss/d(modded score)), the pass walks the graph backwards and builds, for
every float node that depends on ``score`` or on a captured tensor that requires grad, its adjoint
(always float32, also through float16/bfloat16 intermediates, where eager autograd would round
to the low precision). The results are the adjoint of ``score`` and the adjoint of every ``load`` from a
grad-requiring capture; code generation turns the latter into atomic adds into gradient buffers.
The local derivative rules follow PyTorch's ``derivatives.yaml`` (ties of maximum/minimum split
the gradient in half, clamp passes it where the bound is inactive, where routes it, etc.), so the
result matches ``torch.autograd`` on the eager mod.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexattn.compiler.ir import Graph, Node

F32 = torch.float32
_NO_GRADIENT = frozenset({"floor", "ceil", "round", "trunc", "sign", "floordiv", "detach"})


@dataclass(frozen=True)
class Gradient:
    """``dscore``: node of dLoss/dscore; ``captures``: (load node, adjoint node) pairs."""

    dscore: int
    captures: tuple[tuple[int, int], ...]


class _Builder:
    """Float32 node constructors for derivative expressions."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def f(self, i: int) -> int:
        return self.graph.cast(i, F32)

    def c(self, value: float) -> int:
        return self.graph.const(value, F32)

    def op(self, name: str, *args: int, dtype=F32) -> int:
        return self.graph.add(Node(name, tuple(args), dtype))

    def mul(self, a, b):
        return self.op("mul", self.f(a), self.f(b))

    def div(self, a, b):
        return self.op("truediv", self.f(a), self.f(b))

    def add(self, a, b):
        return self.op("add", self.f(a), self.f(b))

    def sub(self, a, b):
        return self.op("sub", self.f(a), self.f(b))

    def neg(self, a):
        return self.op("neg", self.f(a))

    def cmp(self, name, a, b):
        return self.op(name, a, b, dtype=torch.bool)

    def where(self, cond, a, b):
        return self.op("where", cond, self.f(a), self.f(b))


def differentiable_nodes(graph: Graph, output: int, grad_slots: set[int]) -> set[int]:
    """Nodes on a differentiable path from ``score`` or a grad-requiring load."""
    needs: set[int] = set()
    for i, node in enumerate(graph.nodes[: output + 1]):
        if (
            node.op == "score"
            or (node.op == "load" and node.value in grad_slots)
            or (
                node.dtype.is_floating_point
                and node.op not in _NO_GRADIENT
                and any(a in needs and graph.nodes[a].dtype.is_floating_point for a in node.args)
            )
        ):
            needs.add(i)
    return needs


def differentiate(graph: Graph, output: int, grad_slots: set[int]) -> Gradient:
    """Append the gradient nodes to ``graph`` and return where they are."""
    needs = differentiable_nodes(graph, output, grad_slots)
    b = _Builder(graph)
    adjoint: dict[int, int] = {}
    if output in needs:
        adjoint[output] = graph.add(Node("dout", (), F32))
    for i in range(output, -1, -1):
        if i not in adjoint:
            continue
        for arg, contribution in _local_rules(b, graph.nodes[i], i, adjoint[i]):
            if arg in needs:
                adjoint[arg] = b.add(adjoint[arg], contribution) if arg in adjoint else contribution
    loads = tuple(
        (i, adjoint[i])
        for i, node in enumerate(graph.nodes[: output + 1])
        if node.op == "load" and node.value in grad_slots and i in adjoint
    )
    return Gradient(adjoint.get(0, b.c(0.0)), loads)


def _local_rules(b: _Builder, node: Node, i: int, g: int) -> list[tuple[int, int]]:
    """(argument, contribution to its adjoint) pairs for one node with adjoint ``g``."""
    op, args = node.op, node.args
    x = args[0] if args else None
    y = b.f(i)
    if op in ("add", "cast"):
        return [(a, g) for a in args]
    if op == "sub":
        return [(args[0], g), (args[1], b.neg(g))]
    if op == "mul":
        return [(args[0], b.mul(g, args[1])), (args[1], b.mul(g, args[0]))]
    if op == "truediv":
        d = args[1]
        return [(x, b.div(g, d)), (d, b.neg(b.div(b.mul(g, x), b.mul(d, d))))]
    if op == "mod":
        quotient = b.f(b.op("floordiv", x, args[1], dtype=node.dtype))
        return [(x, g), (args[1], b.neg(b.mul(g, quotient)))]
    if op == "fmod":
        quotient = b.op("trunc", b.div(x, args[1]))
        return [(x, g), (args[1], b.neg(b.mul(g, quotient)))]
    if op in ("fmax", "fmin"):
        keep = b.op(
            "logical_or", b.cmp("ge" if op == "fmax" else "le", x, args[1]), b.cmp("ne", args[1], args[1]),
            dtype=torch.bool,
        )  # fmt: skip
        zero = b.c(0.0)
        return [(x, b.where(keep, g, zero)), (args[1], b.where(keep, zero, g))]
    if op == "atan2":
        other = args[1]
        recip = b.div(b.c(1.0), b.add(b.mul(x, x), b.mul(other, other)))
        return [(x, b.mul(g, b.mul(other, recip))), (other, b.mul(g, b.neg(b.mul(x, recip))))]
    if op == "hypot":
        return [(x, b.mul(g, b.div(x, y))), (args[1], b.mul(g, b.div(args[1], y)))]
    if op == "copysign":
        ratio = b.where(b.cmp("eq", b.f(x), b.c(0.0)), b.c(0.0), b.div(y, x))
        return [(x, b.mul(g, ratio))]
    if op == "neg":
        return [(x, b.neg(g))]
    if op == "abs":
        return [(x, b.mul(g, b.op("sign", b.f(x))))]
    if op == "where":
        zero = b.c(0.0)
        return [(args[1], b.where(args[0], g, zero)), (args[2], b.where(args[0], zero, g))]
    if op in ("maximum", "minimum"):
        return _extremum_rules(b, op, args, g)
    if op in ("clamp_min", "clamp_max"):
        lo_side = op == "clamp_min"
        keep = b.cmp("ge" if lo_side else "le", x, args[1])
        zero = b.c(0.0)
        return [(x, b.where(keep, g, zero)), (args[1], b.where(keep, zero, g))]
    if op == "pow":
        return _pow_rules(b, args, y, g)
    unary = _UNARY_DERIVATIVES.get(op)
    if unary is not None:
        return [(x, b.mul(g, unary(b, b.f(x), y)))]
    return []


def _extremum_rules(b: _Builder, op: str, args, g: int) -> list[tuple[int, int]]:
    x, z = args
    half = b.mul(g, b.c(0.5))
    tie = b.where(b.cmp("eq", x, z), half, g)
    zero = b.c(0.0)
    x_loses, z_loses = ("lt", "gt") if op == "maximum" else ("gt", "lt")
    return [(x, b.where(b.cmp(x_loses, x, z), zero, tie)), (z, b.where(b.cmp(z_loses, x, z), zero, tie))]


def _pow_rules(b: _Builder, args, y: int, g: int) -> list[tuple[int, int]]:
    x, e = args
    graph = b.graph
    xf = b.f(x)
    if graph.nodes[e].op == "const":
        c = float(graph.nodes[e].value)
        if c == 0.0:
            return []
        local = b.mul(b.c(c), b.op("pow", xf, b.c(c - 1.0)))
        return [(x, b.mul(g, local))]
    ef = b.f(e)
    zero = b.c(0.0)
    base = b.where(b.cmp("eq", ef, zero), zero, b.mul(g, b.mul(ef, b.op("pow", xf, b.sub(ef, b.c(1.0))))))
    skip = b.op("logical_and", b.cmp("eq", xf, zero), b.cmp("ge", ef, zero), dtype=torch.bool)
    exponent = b.where(skip, zero, b.mul(g, b.mul(y, b.op("log", xf))))
    return [(x, base), (e, exponent)]


_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
# op -> local derivative dy/dx as a function of (builder, x as f32, y as f32)
_UNARY_DERIVATIVES = {
    "exp": lambda b, x, y: y,
    "exp2": lambda b, x, y: b.mul(y, b.c(math.log(2.0))),
    "log": lambda b, x, y: b.div(b.c(1.0), x),
    "log2": lambda b, x, y: b.div(b.c(1.0), b.mul(x, b.c(math.log(2.0)))),
    "log1p": lambda b, x, y: b.div(b.c(1.0), b.add(x, b.c(1.0))),
    "expm1": lambda b, x, y: b.add(y, b.c(1.0)),
    "tanh": lambda b, x, y: b.sub(b.c(1.0), b.mul(y, y)),
    "fast_tanh": lambda b, x, y: b.sub(b.c(1.0), b.mul(y, y)),
    "sigmoid": lambda b, x, y: b.mul(y, b.sub(b.c(1.0), y)),
    "sqrt": lambda b, x, y: b.div(b.c(0.5), y),
    "rsqrt": lambda b, x, y: b.mul(b.c(-0.5), b.mul(y, b.mul(y, y))),
    "sin": lambda b, x, y: b.op("cos", x),
    "cos": lambda b, x, y: b.neg(b.op("sin", x)),
    "erf": lambda b, x, y: b.mul(b.c(_TWO_OVER_SQRT_PI), b.op("exp", b.neg(b.mul(x, x)))),
    "erfc": lambda b, x, y: b.mul(b.c(-_TWO_OVER_SQRT_PI), b.op("exp", b.neg(b.mul(x, x)))),
    "log10": lambda b, x, y: b.div(b.c(1.0), b.mul(x, b.c(math.log(10.0)))),
    "tan": lambda b, x, y: b.add(b.c(1.0), b.mul(y, y)),
    "asin": lambda b, x, y: b.op("rsqrt", b.sub(b.c(1.0), b.mul(x, x))),
    "acos": lambda b, x, y: b.neg(b.op("rsqrt", b.sub(b.c(1.0), b.mul(x, x)))),
    "atan": lambda b, x, y: b.div(b.c(1.0), b.add(b.mul(x, x), b.c(1.0))),
    "sinh": lambda b, x, y: b.op("cosh", x),
    "cosh": lambda b, x, y: b.op("sinh", x),
    "asinh": lambda b, x, y: b.op("rsqrt", b.add(b.mul(x, x), b.c(1.0))),
    "acosh": lambda b, x, y: b.op("rsqrt", b.sub(b.mul(x, x), b.c(1.0))),
    "atanh": lambda b, x, y: b.div(b.c(1.0), b.sub(b.c(1.0), b.mul(x, x))),
}
