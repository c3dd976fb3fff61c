"""A score_mod and its derivative run from the mod compiler's IR with in-place torch ops (fused engine).

The fused engine evaluates a score_mod over a (B, H, rows, cols) score grid per step. Through
``vmap`` every op of the mod allocates a new grid, and the backward pulls dS through the mod with
autograd (the forward ops again, with their saved tensors, then their backward ops). Here the
mod's traced graph (``flexattn.compiler``; ``ir.evaluate``'s op meanings) runs once over
broadcastable index grids (b (B,1,1,1), h (1,H,1,1), q_idx (1,1,r,1), kv_idx (1,1,1,c)), writing
each op's result into an operand grid the graph no longer needs (``out=``), and the backward runs
the compiler's derivative graph (``compiler/autodiff.py``: PyTorch's derivative formulas, float32)
on the forward's kept values, also in place. Both graphs first have their constant factors gathered
(``cpu/scales.py``: soft-capping's backward is three passes instead of five), and a score used
only times a constant takes it in the engine's query scaling (``ModGraph.score_factor``).

Only mods without gathers or searches (``load`` / ``search`` nodes: the kernels clamp an index
there where eager raises, so those stay on ``vmap``) and without learnable captures take this path.

``bias_graph`` is the same for the sdpa engine's bias: the additive term ``f`` of a ``score + f``
mod, gathers included. A gather's indices are checked first (``GatherOutOfRange``: the caller then
evaluates with ``vmap``, which raises eager's IndexError), so no index is ever clamped. Two
differences from ``vmap`` remain, both as in the kernels: a gather whose value the mod does not use
is not evaluated (the trace prunes it), and fp16 / bf16 values times a Python float are computed in
float32 then rounded (per-element eager's opmath; vmap may round the constant first: one ulp).
A value that aliases its operand (``detach``) is never written over, nor its operand after it.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from flexattn.compiler.ir import INPUTS, OP_TORCH, Graph, _apply
from flexattn.cpu.scales import fold_scales, score_factor

_TANH = ("tanh", "fast_tanh")

# ops whose torch function takes ``out=`` (a float result written over a dead operand grid)
_IN_PLACE = frozenset({
    "neg", "abs", "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "tanh", "fast_tanh",
    "sigmoid", "sqrt", "rsqrt", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "erf", "erfc", "add", "sub", "mul", "truediv", "maximum", "minimum", "fmax",
    "fmin", "clamp_min", "clamp_max", "atan2", "hypot", "copysign", "pow", "where",
})  # fmt: skip


@dataclass(frozen=True)
class ModGraph:
    """A score mod's graph: ``output`` (the modded score) and ``dscore`` (its derivative in the raw
    score, times the ``dout`` input) nodes; ``forward`` / ``backward``: the live nodes of each, in
    order. The graph's ``score`` input is ``score_factor`` times the raw score (the engine folds it
    into its query scaling; ``dscore`` stays the derivative in the raw score)."""

    graph: Graph
    output: int
    dscore: int
    forward: tuple[int, ...]
    backward: tuple[int, ...]
    uses: tuple[int, ...]  # per node: how many forward + backward nodes read it
    score_factor: float = 1.0


_CACHE: OrderedDict[tuple, tuple[tuple, ModGraph | None]] = OrderedDict()
_CACHE_SIZE = 64


def mod_graph(score_mod: Callable, device: torch.device, fast_tanh: bool = False) -> ModGraph | None:
    """The ModGraph of ``score_mod``, or None where this path does not apply (gathers, searches,
    captured tensors); cached by the mod's fingerprint (weakly: an entry dies with its objects).
    ``fast_tanh``: tanh as ``2 * sigmoid(2x) - 1`` wherever its value decides no mask bit or index
    (``options.fast_math_for``: only for fp16 / bf16 inputs, whose rounding hides its ~2e-7)."""
    return _cached(score_mod, (str(device), fast_tanh), lambda: _build(score_mod, device, fast_tanh))


def bias_graph(score_mod: Callable, device: torch.device) -> ModGraph | None:
    """The ModGraph of an additive score mod's term ``f`` (``score + f(b, h, q_idx, kv_idx)``):
    ``output`` is ``f`` and there is no derivative (``dscore == output``, ``backward`` empty); None
    where ``f`` is not read from the graph alone (searches, learnable captures, traced reads of
    tensor values) or the mod is not additive. Cached like ``mod_graph``."""
    return _cached(score_mod, (str(device), "bias"), lambda: _build_bias(score_mod, device))


def _cached(score_mod: Callable, key: tuple, build: Callable[[], ModGraph | None]) -> ModGraph | None:
    """``build()``, cached under ``key`` and the mod's fingerprint. Weakly: an entry holds no tensor
    of the user's (a bias graph's captures are weak references, rebound on a hit; ``_freeze``) and
    dies with its objects."""
    from flexattn.compiler.fingerprint import fingerprint_of  # (the compiler loads on first use)

    fp = fingerprint_of(score_mod, None)
    key = None if fp.key is None else (*key, fp.key)
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None and all(guard() is not None for guard in hit[0]):
        frozen, refs = hit[1]
        mg = _thaw(frozen, refs)
        if frozen is None or mg is not None:  # (None: the path does not apply, cached as such)
            _CACHE.move_to_end(key)
            return mg
    mg = build()
    if key is not None:
        _CACHE[key] = (tuple(_weak(obj) for obj in fp.keep), _freeze(mg, fp.keep))
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return mg


def _freeze(mg: ModGraph | None, keep: tuple) -> tuple[ModGraph | None, tuple]:
    """``(mg without its captured tensors, references to them)`` for the cache: weak ones to the
    user's objects (``keep``: what the fingerprint names), strong ones to tensors only the graph
    holds (made while the mod was traced, e.g. ``torch.tensor([...])[h]``)."""
    if mg is None or not mg.graph.captures:
        return mg, ()
    graph = mg.graph.copy()
    users = {id(obj) for obj in keep}
    refs = tuple(weakref.ref(t) if id(t) in users else (lambda t=t: t) for t in graph.captures)
    graph.captures = []
    return replace(mg, graph=graph), refs


def _thaw(frozen: ModGraph | None, refs: tuple) -> ModGraph | None:
    """The cached ModGraph with its captures back; None if one of them is gone (or none was cached)."""
    if not refs:
        return frozen
    tensors = [ref() for ref in refs]
    if any(t is None for t in tensors):
        return None
    graph = frozen.graph.copy()
    graph.captures = tensors
    return replace(frozen, graph=graph)


def _build_bias(score_mod: Callable, device: torch.device) -> ModGraph | None:
    from flexattn.compiler import trace_score_mod
    from flexattn.compiler.additive import additive_term

    program = trace_score_mod(score_mod, device)
    graph = program.graph
    term = additive_term(graph, program.output)
    if (
        term is None
        or program.read_tensor_values
        or any(n.op == "search" for n in graph.nodes)
        or any(t.requires_grad for t in graph.captures)
    ):
        return None
    forward = tuple(graph.live([term]))
    return ModGraph(graph, term, term, forward, (), tuple(_uses(graph, forward)))


class GatherOutOfRange(IndexError):
    """A gather of a graph evaluated here would read outside its tensor (eager raises there)."""


def _shares_storage(t: torch.Tensor, others) -> bool:
    """Whether ``t`` shares memory with one of ``others`` (an empty tensor: assumed so)."""
    if t.numel() == 0:
        return True
    ptr = t.untyped_storage().data_ptr()
    return any(o.numel() == 0 or o.untyped_storage().data_ptr() == ptr for o in others)


def _gather(tensor: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """``tensor[indices]`` (one broadcastable int32 / int64 grid per dim, Python's negative
    indices), or GatherOutOfRange (also for index dtypes eager refuses); never clamped."""
    wrapped = []
    for d, index in enumerate(indices):
        if index.dtype not in (torch.int32, torch.int64):
            raise GatherOutOfRange(f"eager PyTorch does not index with {index.dtype}")
        size = tensor.shape[d]
        low, high = (int(x) for x in torch.aminmax(index)) if index.numel() else (0, 0)
        if low < -size or high >= size:
            raise GatherOutOfRange(f"index {low if low < -size else high} out of range for dim {d} of size {size}")
        index = index.long()
        wrapped.append(torch.where(index < 0, index + size, index) if low < 0 else index)
    return tensor[tuple(wrapped)] if wrapped else tensor


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable: small immutable objects
        return lambda: obj


def _build(score_mod: Callable, device: torch.device, fast_tanh: bool) -> ModGraph | None:
    from flexattn.compiler import trace_score_mod
    from flexattn.compiler.analysis import exact_nodes
    from flexattn.compiler.autodiff import differentiate

    program = trace_score_mod(score_mod, device)
    graph = program.graph.copy()
    if program.read_tensor_values or graph.captures or any(n.op in ("load", "search") for n in graph.nodes):
        return None
    approx = set()
    if fast_tanh:  # (the derivative reads tanh's value: it gets the approximation's)
        exact = exact_nodes(graph, program.output)
        approx = {i for i in graph.live([program.output]) if graph.nodes[i].op in _TANH and i not in exact}
    gradient = differentiate(graph, program.output, set())
    graph, outputs = fold_scales(graph, [program.output, gradient.dscore], approx_tanh=approx)
    factor = score_factor(graph, outputs)  # e.g. soft-capping's 1 / c: the caller scales the score
    if factor != 1.0:
        graph, outputs = fold_scales(graph, outputs, factor)
    output, dscore = outputs
    forward = tuple(graph.live([output]))
    fwd = set(forward)
    backward = tuple(i for i in graph.live([dscore]) if i not in fwd)
    return ModGraph(graph, output, dscore, forward, backward, tuple(_uses(graph, forward + backward)), factor)


class ModValues:
    """One step's evaluation: ``modded(score, b, h, q, kv)`` runs the forward (``score`` may be
    overwritten), ``dscore(dout)`` the derivative on the kept values (``dout`` may be overwritten)."""

    def __init__(self, mg: ModGraph, keep_for_backward: bool, scratch: GridScratch | None = None):
        self.mg, self.keep = mg, keep_for_backward
        self.values: dict[int, torch.Tensor] = {}
        self.left = list(mg.uses) if keep_for_backward else _forward_uses(mg)
        self.owned: set[int] = set()  # nodes whose grid this evaluation made (writable)
        self.scratch = scratch
        if scratch is not None:
            scratch.begin()

    def modded(self, score: torch.Tensor, b, h, q, kv) -> torch.Tensor:
        """The modded score, full shape and contiguous, owned by the caller unless kept; ``score``
        is the raw score times ``score_factor`` (``ModGraph``)."""
        mg = self.mg
        inputs = {"score": score, "b": b, "h": h, "q_idx": q, "kv_idx": kv}
        self.shape = score.shape
        self.owned.add(0)  # the raw score grid is the caller's to give
        self._run(mg.forward, inputs)
        out = self.values[mg.output]
        if tuple(out.shape) != tuple(score.shape) or not out.is_contiguous() or out.dtype != torch.float32:
            out = out.to(torch.float32).expand(score.shape).contiguous()
        elif self.keep and self.left[mg.output] > 0:  # the derivative reads it
            out = self.scratch.grid(out.shape).copy_(out) if self._fits_scratch([out]) else out.clone()
        if not self.keep:
            self.values.clear()
        return out

    def term(self, b, h, q, kv) -> tuple[torch.Tensor, bool]:
        """A bias graph's ``f`` on broadcastable index grids, in its own (broadcast) shape, and
        whether it is a fresh tensor the caller may write over (not an input, capture or constant)."""
        self.shape = torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape)
        self._run(self.mg.forward, {"b": b, "h": h, "q_idx": q, "kv_idx": kv})
        out = self.values[self.mg.output]
        self.values.clear()
        return out, self.mg.output in self.owned and out._base is None

    def dscore(self, dout: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(raw score) from ``dout`` = d(loss)/d(modded score), full shape, contiguous."""
        mg = self.mg
        self._run(mg.backward, {"dout": dout}, dout_owned=True)
        g = self.values[mg.dscore]
        self.values.clear()
        if tuple(g.shape) != tuple(self.shape) or not g.is_contiguous() or g.dtype != torch.float32:
            g = g.to(torch.float32).expand(self.shape).contiguous()
        return g

    def _run(self, order, inputs: dict[str, torch.Tensor], dout_owned: bool = False) -> None:
        graph, values, left, owned = self.mg.graph, self.values, self.left, self.owned
        for i in order:
            node = graph.nodes[i]
            if node.op in INPUTS or node.op == "dout":
                values[i] = inputs[node.op]
                if node.op == "dout" and dout_owned:
                    owned.add(i)
                continue
            if node.op == "const":
                values[i] = torch.tensor(node.value, dtype=node.dtype)
                continue
            args = [values[a] for a in node.args]
            target = None
            if node.op == "load":  # (bias graphs only; 0-dim indices select: a view of the capture)
                capture = graph.captures[node.value]
                values[i] = _gather(capture.detach(), args)
                fresh = not _shares_storage(values[i], [capture])
            else:
                if node.op in _IN_PLACE and node.dtype.is_floating_point:
                    target = self._dead_operand(node, i, args)
                if target is not None:
                    values[i] = OP_TORCH[node.op](*args, out=values[target])
                    owned.discard(target)
                elif node.op in _IN_PLACE and node.dtype == torch.float32 and self._fits_scratch(args):
                    values[i] = OP_TORCH[node.op](*args, out=self.scratch.grid(self.shape))
                else:
                    values[i] = _apply(node, args)
                fresh = target is not None or not _shares_storage(values[i], args)
                if not fresh:  # (detach: the operand itself) neither grid may now be written over
                    owned.difference_update(a for a, t in zip(node.args, args) if _shares_storage(values[i], [t]))
            if fresh:
                owned.add(i)
            for a in node.args:
                left[a] -= 1
                if left[a] == 0 and a != self.mg.output:
                    values.pop(a, None)

    def _fits_scratch(self, args) -> bool:
        """Float32 operands whose broadcast result is a whole grid the scratch can hold."""
        return (
            self.scratch is not None
            and all(t.dtype == torch.float32 for t in args if t.is_floating_point())
            and tuple(torch.broadcast_shapes(*(t.shape for t in args))) == tuple(self.shape)
            and math.prod(self.shape) <= self.scratch.numel
        )

    def _dead_operand(self, node, i: int, args) -> int | None:
        """An operand node whose grid can take the result: owned, read only here, full size, the
        result's dtype and shape."""
        shape = torch.broadcast_shapes(*(t.shape for t in args))
        for a, t in zip(node.args, args):
            if (
                a in self.owned
                and self.left[a] == node.args.count(a)
                and a != self.mg.output
                and t.dtype == node.dtype
                and tuple(t.shape) == tuple(shape)
                and t.is_contiguous()
                and all(u.dtype == node.dtype for u in args if u.is_floating_point())
            ):
                return a
        return None


class GridScratch:
    """Reused float32 grids for the values a ``ModValues`` cannot write over an operand (a fresh
    grid of a step's size costs its page faults every step). Every grid handed out stays the
    caller's until the next ``ModValues`` on this scratch begins: one step's values, its modded
    score and its derivative included, never share memory, and a step holds at most as many grids
    as its graph has such values."""

    def __init__(self, numel: int):
        self.numel = numel
        self.grids: list[torch.Tensor] = []
        self.used = 0

    def begin(self) -> None:
        self.used = 0

    def grid(self, shape: torch.Size) -> torch.Tensor:
        """A float32 grid of ``shape`` (at most ``numel`` elements)."""
        if self.used == len(self.grids):
            self.grids.append(torch.empty(self.numel, dtype=torch.float32))
        self.used += 1
        return self.grids[self.used - 1][: math.prod(shape)].view(shape)


def _forward_uses(mg: ModGraph) -> list[int]:
    return _uses(mg.graph, mg.forward)


def _uses(graph: Graph, order) -> list[int]:
    """Per node of ``graph``: how many of the nodes ``order`` lists read it."""
    uses = [0] * len(graph.nodes)
    for i in order:
        for a in graph.nodes[i].args:
            uses[a] += 1
    return uses
