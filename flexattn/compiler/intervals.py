"""Interval (range) analysis of a mask mod: decide whole tiles of the mask from their index ranges.

For one tile of a block mask — a batch ``b``, a head ``h``, queries ``[q_lo, q_hi]`` and keys
``[kv_lo, kv_hi]`` — the generated function bounds every integer and boolean value of the mod's IR by
an int64 interval and returns the bounds of the mask itself: ``lo == 1`` means every pair of the tile
is allowed (a *full* block), ``hi == 0`` that none is (an empty block); otherwise the tile is
undecided and the caller evaluates it element by element. The analysis is sound, never exact by
luck: each transfer function (``interval_math.py``) contains every value its operation can take, and
anything it does not model is unknown (the dtype's whole range, or ``[0, 1]`` for booleans):

- modelled: constants, casts between integer/bool dtypes, ``+ - *``, negation, abs, sign, Python
  ``//`` and ``%``, minimum/maximum/clamp, comparisons, ``& | ^ ~``, shifts, logical ops,
  ``where``, searchsorted over a captured sorted tensor, and gathers from captured integer/bool
  tensors (below); float32 values too (casts from and to integers, ``+ - * /``, negation, abs,
  minimum/maximum, floor/ceil/trunc, comparisons, ``where``, float32 gathers), with bounds widened
  where rounding could differ (``interval_math``: the float section);
- unknown: float16/bfloat16/float64 values, transcendental functions (exp, log, tanh, ...),
  ``round``, integer ``pow``.

Gathers: a load whose index varies over the tile along one dimension of the captured tensor
(``doc[q_idx]``, ``doc[b, kv_idx]``) is bounded by the min and max of the tensor over the index
range, read from a sparse table (``range_tables.py``) built once per call on the tensor's device; the
index range is widened to whole *grains* of positions (exact when the block size is a multiple of
the grain). A load indexed by per-tile constants (``prefix[b]``) reads the element itself; any other
load is bounded by the whole tensor's min and max.

The generated function (calling convention)::

    lo, hi = interval_fn(b, h, q_lo, q_hi, kv_lo, kv_hi, caps, ranges)

``b``, ``h``, ``q_lo``, ``q_hi``: int32 scalars; ``kv_lo``, ``kv_hi``: int32 ``[T]`` (one entry per kv
block of a row of tiles); ``caps``: the mask mod's ``KernelMod.args``; ``ranges``: the tables'
tuple (``range_tables.range_args``); ``lo``, ``hi``: int64 ``[T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexattn.compiler.analysis import M, N, capture_layouts, tile_dims
from flexattn.compiler.ir import COMPARISONS, Graph
from flexattn.compiler.lowering import capture_symbols, unpack_capture

_INT_RANGE = {
    torch.bool: (0, 1),
    torch.uint8: (0, 2**8 - 1),
    torch.int8: (-(2**7), 2**7 - 1),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.int64: (-(2**63), 2**63 - 1),
}
_MONOTONE_BINARY = {
    "add": "im.add",
    "sub": "im.sub",
    "mul": "im.mul",
    "floordiv": "im.floordiv",
    "mod": "im.remainder",
}
_COMPARE = {  # op -> (helper, swap operands)
    "lt": ("im.lt", False),
    "le": ("im.le", False),
    "gt": ("im.lt", True),
    "ge": ("im.le", True),
    "eq": ("im.eq", False),
    "ne": ("im.ne", False),
}


@dataclass(frozen=True)
class RangeTableSpec:
    """A sparse min/max table along dimension ``dim`` of captured tensor ``slot``."""

    slot: int
    dim: int


@dataclass(frozen=True)
class IntervalPlan:
    """What the generated interval function needs at run time, and what it leaves undecided.

    ``tables``: sparse tables to build (``range_args``); ``global_slots``: captures whose overall
    min/max bound the loads that no table serves; ``unknown_ops``: IR ops the analysis treats as
    unknown (their tiles are evaluated element by element), for ``explain``.
    """

    tables: tuple[RangeTableSpec, ...]
    global_slots: tuple[int, ...]
    unknown_ops: tuple[str, ...]


def _is_int(dtype: torch.dtype) -> bool:
    return dtype in _INT_RANGE


class _IntervalEmitter:
    """Emits ``l{i}, u{i}`` for each node: int64 bounds of integers/bools, float32 bounds of float32
    values (NaN: unknown); other float dtypes get no bounds (unknown to their users)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.dims = tile_dims(graph)
        self.layouts = capture_layouts(graph)
        self.lines: list[str] = []
        self.unknown: set[str] = set()
        self.tables: dict[tuple[int, int], int] = {}
        self.global_slots: set[int] = set()
        self.unpacked: set[int] = set()

    # ---- helpers -----------------------------------------------------------------------------------

    def kind(self, i: int) -> str | None:
        """ "int" (int64 bounds: integers and bools), "float" (float32 bounds) or None (unknown)."""
        dtype = self.graph.nodes[i].dtype
        if _is_int(dtype):
            return "int"
        return "float" if dtype == torch.float32 else None

    def known(self, i: int) -> bool:
        return self.kind(i) is not None

    def bounds(self, i: int) -> tuple[str, str]:
        return f"l{i}", f"u{i}"

    def set(self, i: int, lo: str, hi: str | None = None) -> None:
        """``l{i}, u{i} = lo, hi`` (or ``= lo`` when lo is a call returning both)."""
        target = f"l{i}, u{i}"
        self.lines.append(f"{target} = {lo}" if hi is None else f"{target} = {lo}, {hi}")

    def set_top(self, i: int, reason: str | None = None) -> None:
        lo, hi = _INT_RANGE[self.graph.nodes[i].dtype]
        if reason:
            self.unknown.add(reason)
        self.set(i, f"tl.full((), {lo}, tl.int64)", f"tl.full((), {hi}, tl.int64)")

    def fit(self, i: int) -> None:
        dtype = self.graph.nodes[i].dtype
        if dtype not in (torch.int64, torch.bool):
            lo, hi = _INT_RANGE[dtype]
            self.set(i, f"im.fit(l{i}, u{i}, {lo}, {hi})")

    def set_nan(self, i: int, reason: str | None = None) -> None:
        """Unknown float32 bounds."""
        if reason:
            self.unknown.add(reason)
        self.set(i, 'tl.full((), float("nan"), tl.float32)', 'tl.full((), float("nan"), tl.float32)')

    def truth(self, a: int) -> tuple[str, str]:
        """Boolean bounds of ``a != 0`` (a itself when boolean)."""
        if self.graph.nodes[a].dtype == torch.bool:
            return self.bounds(a)
        if self.kind(a) is None:
            return "tl.full((), 0, tl.int64)", "tl.full((), 1, tl.int64)"
        name = f"t{a}"
        helper = "im.truth" if self.kind(a) == "int" else "im.f_truth"
        self.lines.append(f"{name}_l, {name}_h = {helper}(l{a}, u{a})")
        return f"{name}_l", f"{name}_h"

    # ---- nodes ----------------------------------------------------------------------------------

    def emit(self, order: list[int]) -> None:
        for i in order:
            node = self.graph.nodes[i]
            kind = self.kind(i)
            if kind is None:
                if node.op not in ("const", "score", "cast", "load") and node.op not in COMPARISONS:
                    self.unknown.add(f"{str(node.dtype).removeprefix('torch.')} {node.op}")
                continue
            if kind == "float":
                self._emit_float(i)
            else:
                self._emit(i)

    def _emit(self, i: int) -> None:
        node = self.graph.nodes[i]
        op, args = node.op, node.args
        if op in ("b", "h"):
            self.set(i, f"{op}.to(tl.int64)", f"{op}.to(tl.int64)")
        elif op == "q_idx":
            self.set(i, "q_lo.to(tl.int64)", "q_hi.to(tl.int64)")
        elif op == "kv_idx":
            self.set(i, "kv_lo.to(tl.int64)", "kv_hi.to(tl.int64)")
        elif op == "const":
            value = int(node.value)
            self.set(i, f"tl.full((), {value}, tl.int64)", f"tl.full((), {value}, tl.int64)")
        elif op not in ("load", "search") and not all(self.kind(a) == "int" for a in args):
            self._emit_from_float(i)
        elif op == "cast":
            self._emit_cast(i)
        elif op == "where":
            c_lo, c_hi = self.truth(args[0])
            self.set(i, f"im.select({c_lo}, {c_hi}, l{args[1]}, u{args[1]}, l{args[2]}, u{args[2]})")
        elif op == "load":
            self._emit_load(i)
        elif op == "search":
            self._emit_search(i)
        elif len(args) == 1:
            self._emit_unary(i)
        else:
            self._emit_binary(i)

    def _emit_from_float(self, i: int) -> None:
        """An integer/bool node with float operands: comparisons and casts of float32 bounds."""
        node = self.graph.nodes[i]
        op, args = node.op, node.args
        if any(self.kind(a) is None for a in args):
            self.set_top(i)
        elif op == "cast" and node.dtype == torch.bool:
            self.set(i, f"im.f_truth(l{args[0]}, u{args[0]})")
        elif op == "cast":
            low, high = _INT_RANGE[node.dtype]
            self.set(i, f"im.f_to_int(l{args[0]}, u{args[0]}, {float(low - 1)!r}, {float(high + 1)!r})")
            self.fit(i)
        elif op in _COMPARE:
            helper, swap = _COMPARE[op]
            a, b = args[::-1] if swap else args
            self.set(i, f"{helper}(l{a}, u{a}, l{b}, u{b})")
        else:
            self.set_top(i, f"{op} of floats")

    def _emit_float(self, i: int) -> None:
        """A float32 node (see interval_math's float section for the rounding argument)."""
        node = self.graph.nodes[i]
        op, args = node.op, node.args
        if op == "const":
            value = float(node.value)
            if value != value or value in (float("inf"), float("-inf")):
                self.set_nan(i)
            else:
                self.set(i, f"tl.full((), {value!r}, tl.float32)", f"tl.full((), {value!r}, tl.float32)")
        elif op == "score" or (op != "load" and any(self.kind(a) is None for a in args)):
            self.set_nan(i, f"float {op}")
        elif op == "load":
            self._emit_load(i)
            self.set(i, f"im.f_known(l{i}, u{i})")
        elif op == "cast":  # from an integer (float32 -> float32 casts do not exist)
            (a,) = args
            self.set(i, f"l{a}.to(tl.float32)", f"u{a}.to(tl.float32)")
        elif op == "where":
            c_lo, c_hi = self.truth(args[0])
            self.set(i, f"im.f_select({c_lo}, {c_hi}, l{args[1]}, u{args[1]}, l{args[2]}, u{args[2]})")
        elif len(args) == 1:
            (a,) = args
            exact = {"neg": (f"-u{a}", f"-l{a}"), "detach": (f"l{a}", f"u{a}")}
            exact |= {f: (f"tl.{f}(l{a})", f"tl.{f}(u{a})") for f in ("floor", "ceil")}
            exact["trunc"] = (f"tm.trunc(l{a})", f"tm.trunc(u{a})")
            if op in exact:
                self.set(i, *exact[op])
            elif op == "abs":
                self.set(i, f"im.f_absolute(l{a}, u{a})")
            else:
                self.set_nan(i, f"float {op}")
        else:
            a, b = args
            operands = f"l{a}, u{a}, l{b}, u{b}"
            if op in ("add", "sub", "mul"):
                self.set(i, f"im.f_{op}({operands})")
            elif op == "truediv":
                self.set(i, f"im.f_div({operands}, {_power_of_two(self.graph.nodes[b])})")
            elif op in ("maximum", "clamp_min", "minimum", "clamp_max"):
                self.set(i, f"im.f_minmax({operands}, {op in ('maximum', 'clamp_min')})")
            else:
                self.set_nan(i, f"float {op}")

    def _emit_cast(self, i: int) -> None:
        node = self.graph.nodes[i]
        (a,) = node.args
        if node.dtype == torch.bool:
            self.set(i, *self.truth(a))
            return
        self.set(i, f"l{a}", f"u{a}")
        src_lo, src_hi = _INT_RANGE[self.graph.nodes[a].dtype]
        dst_lo, dst_hi = _INT_RANGE[node.dtype]
        if not (dst_lo <= src_lo and src_hi <= dst_hi):
            self.fit(i)

    def _emit_unary(self, i: int) -> None:
        node = self.graph.nodes[i]
        op, (a,) = node.op, node.args
        boolean = node.dtype == torch.bool
        if op in ("detach", "floor", "ceil", "round", "trunc"):  # identity on integers
            self.set(i, f"l{a}", f"u{a}")
        elif op == "logical_not" or (op == "invert" and boolean):
            lo, hi = self.truth(a)
            self.set(i, f"1 - {hi}", f"1 - {lo}")
        elif op in ("neg", "abs", "sign", "invert"):
            helper = {"neg": "im.neg", "abs": "im.absolute", "sign": "im.sign", "invert": "im.invert"}[op]
            self.set(i, f"{helper}(l{a}, u{a})")
            self.fit(i)
        else:
            self.set_top(i, op)

    def _emit_binary(self, i: int) -> None:
        node = self.graph.nodes[i]
        op, (a, b) = node.op, node.args
        boolean = node.dtype == torch.bool
        operands = f"l{a}, u{a}, l{b}, u{b}"
        if op in _COMPARE:
            helper, swap = _COMPARE[op]
            operands = f"l{b}, u{b}, l{a}, u{a}" if swap else operands
            self.set(i, f"{helper}({operands})")
        elif op in ("logical_and", "logical_or", "logical_xor") or (boolean and op in ("and", "or", "xor")):
            (al, ah), (bl, bh) = self.truth(a), self.truth(b)
            kind = op.removeprefix("logical_")
            if kind == "xor":
                self.set(i, f"im.logical_xor({al}, {ah}, {bl}, {bh})")
            else:
                sym = "&" if kind == "and" else "|"
                self.set(i, f"{al} {sym} {bl}", f"{ah} {sym} {bh}")
        elif boolean and op in ("add", "mul", "maximum", "minimum"):
            sym = "|" if op in ("add", "maximum") else "&"
            self.set(i, f"l{a} {sym} l{b}", f"u{a} {sym} u{b}")
        elif op in _MONOTONE_BINARY:
            self.set(i, f"{_MONOTONE_BINARY[op]}({operands})")
            self.fit(i)
        elif op in ("maximum", "clamp_min"):
            self.set(i, f"tl.maximum(l{a}, l{b})", f"tl.maximum(u{a}, u{b})")
        elif op in ("minimum", "clamp_max"):
            self.set(i, f"tl.minimum(l{a}, l{b})", f"tl.minimum(u{a}, u{b})")
        elif op == "and":
            self.set(i, f"im.bit_and({operands})")
        elif op in ("or", "xor"):
            self.set(i, f"im.bit_or({operands}, {op == 'xor'})")
            self.fit(i)
        elif op in ("lshift", "rshift"):
            self.set(i, f"im.shift({operands}, {op == 'lshift'})")
            self.fit(i)
        else:
            self.set_top(i, op)

    # ---- gathers --------------------------------------------------------------------------------------

    def _capture(self, slot: int) -> tuple[str, list[str], list[str]]:
        layout = self.layouts[slot]
        ptr, sizes, strides = capture_symbols(slot, layout.ndim)
        if slot not in self.unpacked:
            self.unpacked.add(slot)
            self.lines += unpack_capture("caps", layout.base, ptr, sizes, strides, layout.wide)
        return ptr, sizes, strides

    def _global(self, slot: int) -> tuple[str, str]:
        self.global_slots.add(slot)
        return f"g{slot}_min", f"g{slot}_max"

    def _emit_load(self, i: int) -> None:
        node = self.graph.nodes[i]
        slot, args = node.value, node.args
        ptr, sizes, strides = self._capture(slot)
        ndim = len(args)
        wrapped = []
        for d, a in enumerate(args):
            if self.kind(a) != "int":  # a float index: any position
                self.lines.append(
                    f"w{i}_{d}l, w{i}_{d}h = im.wrap(tl.full((), 0, tl.int64), {sizes[d]} - 1, {sizes[d]})"
                )
            else:
                self.lines.append(f"w{i}_{d}l, w{i}_{d}h = im.wrap(l{a}, u{a}, {sizes[d]})")
            wrapped.append((f"w{i}_{d}l", f"w{i}_{d}h"))
        ranged = [d for d, a in enumerate(args) if self.kind(a) != "int" or self.dims[a] & {M, N}]
        is_float = self.kind(i) == "float"
        if len(ranged) > 1:
            gmin, gmax = self._global(slot)
            self.set(i, f"tl.full((), 0, tl.int64) + {gmin}", f"tl.full((), 0, tl.int64) + {gmax}")
            return
        points = [d for d in range(ndim) if d not in ranged]
        valid = " & ".join(f"({wrapped[d][0]} == {wrapped[d][1]})" for d in points)
        if not ranged:
            offset = " + ".join(f"{wrapped[d][0]} * {strides[d]}" for d in range(ndim)) or "0"
            bound_type = "tl.float32" if is_float else "tl.int64"
            self.lines.append(f"v{i} = tl.load({ptr} + {offset}).to({bound_type})")
            self._guarded(i, f"v{i}", f"v{i}", valid, slot)
            return
        (d,) = ranged
        table = self.tables.setdefault((slot, d), len(self.tables))
        row_terms, stride = [], ""
        for j in reversed(points):  # row-major over the other dimensions
            row_terms.append(f"{wrapped[j][0]}{stride}")
            stride += f" * {sizes[j]}"
        row = " + ".join(row_terms) or "0"
        t = f"r{table}"
        lo, hi = wrapped[d]
        helper = "im.f_range_min_max" if is_float else "im.range_min_max"
        self.lines.append(
            f"m{i}_l, m{i}_h = {helper}({t}_min, {t}_max, {t}_lg, {row}, {lo}, {hi}, "
            f"{t}_rows, {t}_blocks, {t}_grain)"
        )
        self._guarded(i, f"m{i}_l", f"m{i}_h", valid, slot)

    def _guarded(self, i: int, lo: str, hi: str, valid: str, slot: int) -> None:
        """Bounds ``lo, hi`` where the per-tile index dims ``valid`` are single values, else global."""
        if not valid:
            self.set(i, lo, hi)
            return
        gmin, gmax = self._global(slot)
        self.lines.append(f"ok{i} = {valid}")
        self.set(i, f"tl.where(ok{i}, {lo}, {gmin})", f"tl.where(ok{i}, {hi}, {gmax})")

    def _emit_search(self, i: int) -> None:
        node = self.graph.nodes[i]
        (slot, right), (v,) = node.value, node.args
        ptr, sizes, strides = self._capture(slot)
        if self.kind(v) != "int" or not _is_int(self.graph.captures[slot].dtype):
            self.set(i, "tl.full((), 0, tl.int64)", f"{sizes[0]}.to(tl.int64)")
            self.unknown.add("float searchsorted")
            return
        lo = f"tm.searchsorted({ptr}, {sizes[0]}, {strides[0]}, l{v}, {right}).to(tl.int64)"
        hi = f"tm.searchsorted({ptr}, {sizes[0]}, {strides[0]}, u{v}, {right}).to(tl.int64)"
        self.set(i, lo, hi)

    # ---- the ranges tuple ---------------------------------------------------------------------------

    def prologue(self) -> list[str]:
        """Lines unpacking ``ranges``: globals first (slot order), then the tables (plan order)."""
        lines, k = [], 0
        for slot in sorted(self.global_slots):
            lines.append(f"g{slot}_min = tl.load(ranges[{k}])")
            lines.append(f"g{slot}_max = tl.load(ranges[{k}] + 1)")
            k += 1
        for _, table in sorted(self.tables.items(), key=lambda item: item[1]):
            t = f"r{table}"
            lines.append(f"{t}_min, {t}_max, {t}_lg = ranges[{k}], ranges[{k + 1}], ranges[{k + 2}]")
            lines.append(
                f"{t}_rows, {t}_blocks, {t}_grain = tm.arg_i64(ranges[{k + 3}]), "
                f"tm.arg_i64(ranges[{k + 4}]), tm.arg_i64(ranges[{k + 5}])"
            )
            k += 6
        return lines

    def plan(self) -> IntervalPlan:
        tables = tuple(
            RangeTableSpec(slot, dim) for (slot, dim), _ in sorted(self.tables.items(), key=lambda x: x[1])
        )
        return IntervalPlan(tables, tuple(sorted(self.global_slots)), tuple(sorted(self.unknown)))


def _power_of_two(node) -> bool:
    """A constant divisor 2**k: dividing by it is exact in every form (x / c, x * (1 / c))."""
    if node.op != "const" or not isinstance(node.value, int | float) or node.value == 0:
        return False
    value = abs(float(node.value))
    return math.isfinite(value) and math.frexp(value)[0] == 0.5


def interval_function(graph: Graph, output: int, name: str) -> tuple[str, IntervalPlan]:
    """Source of the ``@triton.jit`` interval function of a mask graph, and its run-time plan."""
    em = _IntervalEmitter(graph)
    em.emit(graph.live([output]))
    body = em.prologue() + em.lines
    if em.known(output):
        lo, hi = em.bounds(output)
        body += [
            f"lo, _ = tl.broadcast(({lo}).to(tl.int64), kv_lo)",
            f"hi, _ = tl.broadcast(({hi}).to(tl.int64), kv_lo)",
        ]
    else:
        body += ["lo = tl.zeros_like(kv_lo).to(tl.int64)", "hi = lo + 1"]
    body.append("return lo, hi")
    lines = [
        "@triton.jit",
        f"def {name}(b, h, q_lo, q_hi, kv_lo, kv_hi, caps, ranges):",
        '    """Bounds of the mask over one row of tiles (generated; see flexattn.compiler.intervals)."""',
    ]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines), em.plan()
