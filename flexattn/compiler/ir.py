"""The mod IR: a typed DAG of per-element operations.

A traced mod becomes a ``Graph``: a list of ``Node``s in topological order (every node's arguments
come earlier), hash-consed so that equal sub-expressions are shared. Nodes 0-4 are the mod's
inputs (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``). Every node is a *per-element* value — one
number per (b, h, q_idx, kv_idx) — with a torch dtype; type promotion has already happened at trace
time, so the operands of an op have the op's compute dtype (explicit ``cast`` nodes make every
conversion visible). One exception, mirroring PyTorch's "opmath": the constant operands of a
float16/bfloat16 op are float32 constants, and such ops compute in float32 and round the result.

Ops (``Node.op``):

    inputs      score b h q_idx kv_idx dout            (dout only in gradient graphs)
    const       value = the Python number
    load        value = capture slot; args = one index per dimension of the captured tensor
    search      value = (capture slot, right); args = (v,): torch.searchsorted(capture, v, right=right)
    cast        to Node.dtype
    unary       neg abs sign signbit exp exp2 log log2 log10 log1p expm1 tanh fast_tanh sigmoid
                sqrt rsqrt floor ceil round trunc sin cos tan asin acos atan sinh cosh asinh
                acosh atanh erf erfc invert logical_not detach
    binary      add sub mul truediv floordiv mod fmod pow maximum minimum fmax fmin clamp_min
                clamp_max atan2 hypot copysign lt le gt ge eq ne and or xor lshift rshift
                logical_and logical_or logical_xor
    ternary     where (cond, a, b)

``OP_TORCH`` gives each op's meaning as a torch function; ``evaluate`` runs a graph with torch
(used for constant folding and as an executable specification in tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INPUTS = ("score", "b", "h", "q_idx", "kv_idx")
INPUT_DTYPES = (torch.float32, torch.int32, torch.int32, torch.int32, torch.int32)
LOW_PRECISION = (torch.float16, torch.bfloat16)

OP_TORCH = {
    "neg": torch.neg,
    "abs": torch.abs,
    "sign": torch.sign,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "log": torch.log,
    "log2": torch.log2,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "tanh": torch.tanh,
    "fast_tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,
    "trunc": torch.trunc,
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "asin": torch.asin,
    "acos": torch.acos,
    "atan": torch.atan,
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "asinh": torch.asinh,
    "acosh": torch.acosh,
    "atanh": torch.atanh,
    "erf": torch.erf,
    "erfc": torch.erfc,
    "log10": torch.log10,
    "signbit": torch.signbit,
    "invert": torch.bitwise_not,
    "detach": torch.detach,
    "logical_not": torch.logical_not,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "truediv": torch.true_divide,
    "floordiv": torch.floor_divide,
    "mod": torch.remainder,
    "fmod": torch.fmod,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "fmax": torch.fmax,
    "fmin": torch.fmin,
    "atan2": torch.atan2,
    "hypot": torch.hypot,
    "copysign": torch.copysign,
    "clamp_min": torch.clamp_min,
    "clamp_max": torch.clamp_max,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "eq": torch.eq,
    "ne": torch.ne,
    "and": torch.bitwise_and,
    "or": torch.bitwise_or,
    "xor": torch.bitwise_xor,
    "lshift": torch.bitwise_left_shift,
    "rshift": torch.bitwise_right_shift,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
    "where": torch.where,
}
COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
LOGICAL = frozenset({"logical_and", "logical_or", "logical_xor", "logical_not"})


@dataclass(frozen=True)
class Node:
    """One per-element value. ``args`` index earlier nodes of the same graph."""

    op: str
    args: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    value: Any = None

    def key(self) -> tuple:
        """Structural identity (floats by repr, so that nan == nan and -0.0 != 0.0)."""
        value = self.value
        if isinstance(value, float | int | bool):
            value = (type(value).__name__, repr(value))
        return (self.op, self.args, str(self.dtype), value)


@dataclass(frozen=True)
class CaptureSpec:
    """What the generated code depends on for one captured tensor: never its values or sizes."""

    dtype: torch.dtype
    ndim: int
    requires_grad: bool
    wide: bool  # element offsets may reach 2**31: index arithmetic in int64 instead of int32


def capture_spec(tensor: torch.Tensor, differentiable: bool) -> CaptureSpec:
    requires_grad = differentiable and tensor.requires_grad and tensor.is_floating_point()
    max_offset = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    wide = max(max_offset, tensor.numel()) >= 2**31 - 1
    return CaptureSpec(tensor.dtype, tensor.ndim, requires_grad, wide)


class Graph:
    """An append-only, hash-consed DAG of ``Node``s plus the tensors its loads read."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.captures: list[torch.Tensor] = []
        self._index: dict[tuple, int] = {}
        self._capture_slots: dict[int, int] = {}
        for name, dtype in zip(INPUTS, INPUT_DTYPES):
            self.add(Node(name, (), dtype))

    def __len__(self) -> int:
        return len(self.nodes)

    def copy(self) -> Graph:
        """A copy with the same nodes and capture slots, to append nodes to."""
        new = Graph.__new__(Graph)
        new.nodes, new.captures = list(self.nodes), list(self.captures)
        new._index, new._capture_slots = dict(self._index), dict(self._capture_slots)
        return new

    def add(self, node: Node) -> int:
        """Append ``node`` (or return the index of an equal node); folds all-constant ops."""
        if (
            (node.op in OP_TORCH or node.op == "cast")
            and node.args
            and all(self.nodes[a].op == "const" for a in node.args)
        ):
            node = _fold(self, node)
        key = node.key()
        found = self._index.get(key)
        if found is not None:
            return found
        self.nodes.append(node)
        self._index[key] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def const(self, value: bool | int | float, dtype: torch.dtype) -> int:
        """A constant of ``dtype``, its value rounded to that dtype."""
        value = torch.tensor(value, dtype=dtype).item()
        return self.add(Node("const", (), dtype, value))

    def cast(self, arg: int, dtype: torch.dtype) -> int:
        if self.nodes[arg].dtype == dtype:
            return arg
        return self.add(Node("cast", (arg,), dtype))

    def capture(self, tensor: torch.Tensor) -> int:
        """The slot of a captured tensor (one slot per distinct tensor object)."""
        slot = self._capture_slots.get(id(tensor))
        if slot is None:
            slot = len(self.captures)
            self.captures.append(tensor)
            self._capture_slots[id(tensor)] = slot
        return slot

    def live(self, outputs: list[int]) -> list[int]:
        """Indices of the nodes the outputs depend on, in topological order."""
        seen = set(outputs)
        for i in sorted(outputs, reverse=True):
            if i in seen:
                seen.update(self.nodes[i].args)
        for i in range(len(self.nodes) - 1, -1, -1):
            if i in seen:
                seen.update(self.nodes[i].args)
        return sorted(seen)

    def pruned(self, outputs: list[int]) -> tuple[Graph, list[int]]:
        """A copy holding only what ``outputs`` need (inputs always kept), renumbered."""
        keep = sorted(set(self.live(outputs)) | set(range(len(INPUTS))))
        new = Graph()
        remap: dict[int, int] = {}
        for i in keep:
            node = self.nodes[i]
            args = tuple(remap[a] for a in node.args)
            value = node.value
            if node.op == "load":
                value = new.capture(self.captures[node.value])
            elif node.op == "search":
                value = (new.capture(self.captures[node.value[0]]), node.value[1])
            remap[i] = new.add(Node(node.op, args, node.dtype, value))
        return new, [remap[o] for o in outputs]

    def structure_key(self, outputs: list[int], differentiable: bool) -> tuple:
        """The cache key: node structure and capture dtypes/ranks, never values or sizes."""
        specs = tuple(capture_spec(t, differentiable) for t in self.captures)
        return (tuple(n.key() for n in self.nodes), tuple(outputs), specs)

    def format(self, outputs: list[int]) -> str:
        """A readable listing, one node per line."""
        lines = []
        used = {a for node in self.nodes for a in node.args} | set(outputs)
        for i, node in enumerate(self.nodes):
            if node.op in INPUTS or node.op == "dout":
                if i not in used:
                    continue
                rhs = f"input {node.op}"
            elif node.op == "const":
                rhs = repr(node.value)
            elif node.op == "load":
                t = self.captures[node.value]
                idx = ", ".join(f"%{a}" for a in node.args)
                rhs = f"capture{node.value}{tuple(t.shape)}[{idx}]"
            elif node.op == "search":
                slot, right = node.value
                t = self.captures[slot]
                rhs = f"searchsorted(capture{slot}{tuple(t.shape)}, %{node.args[0]}, right={right})"
            else:
                rhs = f"{node.op}(" + ", ".join(f"%{a}" for a in node.args) + ")"
            dtype = str(node.dtype).replace("torch.", "")
            lines.append(f"  %{i}: {dtype} = {rhs}")
        lines.append("  return " + ", ".join(f"%{o}" for o in outputs))
        return "\n".join(lines)


def _fold(graph: Graph, node: Node) -> Node:
    """Evaluate an op whose arguments are all constants."""
    args = [graph.nodes[a].value for a in node.args]
    tensors = [torch.tensor(v, dtype=graph.nodes[a].dtype) for v, a in zip(args, node.args)]
    result = _apply(node, tensors)
    return Node("const", (), node.dtype, result.item())


def _apply(node: Node, args: list[torch.Tensor]) -> torch.Tensor:
    if node.op == "cast":
        return args[0].to(node.dtype)
    return OP_TORCH[node.op](*args).to(node.dtype)


def wrap_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Python-style negative indices, then clamped into ``[0, size)`` (what the kernels do)."""
    index = torch.where(index < 0, index + size, index)
    return index.clamp(0, size - 1)


def evaluate(graph: Graph, outputs: list[int], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run the graph with torch on broadcastable input tensors (``inputs`` maps input names)."""
    values: list[torch.Tensor | None] = [None] * len(graph.nodes)
    for i in graph.live(outputs):
        node = graph.nodes[i]
        if node.op in INPUTS or node.op == "dout":
            values[i] = inputs[node.op]
        elif node.op == "const":
            values[i] = torch.tensor(node.value, dtype=node.dtype)
        elif node.op == "load":
            tensor = graph.captures[node.value].detach()
            index = tuple(
                wrap_index(values[a].long(), tensor.shape[d]).to(tensor.device)
                for d, a in enumerate(node.args)
            )
            values[i] = tensor[index] if index else tensor
        elif node.op == "search":
            slot, right = node.value
            tensor = graph.captures[slot].detach()
            found = torch.searchsorted(
                tensor, values[node.args[0]].to(tensor.device).contiguous(), right=right
            )
            values[i] = found.to(node.dtype)
        else:
            values[i] = _apply(node, [values[a] for a in node.args])
    return [values[o] for o in outputs]
