"""Lowering of IR nodes to Triton expressions, one line per node (used by codegen.py).

Each op becomes a Triton expression with PyTorch's semantics: float16/bfloat16 arithmetic in
float32 ("opmath"), Python-style integer ``//`` and ``%``, NaN-propagating min/max, gathers with
Python-style negative indices clamped into range. The interpreter target uses only core ``tl`` ops
(helpers in triton_math.py); GPU targets use libdevice where it is more accurate, and the accurate
forms wherever a value decides a mask bit or an index (``analysis.exact_nodes``).
"""

from __future__ import annotations

import math

import torch

from flexattn.compiler.analysis import capture_layouts, exact_nodes, non_negative, tile_dims
from flexattn.compiler.diagonals import diagonal_loads
from flexattn.compiler.ir import COMPARISONS, INPUTS, LOW_PRECISION, Graph

TL_DTYPES = {
    torch.bool: "tl.int1",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
}
_OPMATH = frozenset(
    [
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "exp",
        "exp2",
        "log",
        "log2",
        "log1p",
        "expm1",
        "tanh",
        "fast_tanh",
        "sigmoid",
        "sqrt",
        "rsqrt",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "sinh",
        "cosh",
        "asinh",
        "acosh",
        "atanh",
        "erf",
        "erfc",
        "log10",
        "fmod",
        "atan2",
        "hypot",
        "copysign",
        "round",
        "trunc",
        "floor",
        "ceil",
    ]
)
# op -> (interpreter expression, GPU expression); "{0}" is the operand.
_UNARY = {
    "neg": ("-{0}", "-{0}"),
    "abs": ("tl.abs({0})", "tl.abs({0})"),
    "sign": ("tm.sign({0})", "tm.sign({0})"),
    "exp": ("tl.exp({0})", "tl.exp({0})"),
    "exp2": ("tl.exp2({0})", "tl.exp2({0})"),
    "log": ("tl.log({0})", "tl.log({0})"),
    "log2": ("tl.log2({0})", "tl.log2({0})"),
    "log1p": ("tm.log1p({0})", "libdevice.log1p({0})"),
    "expm1": ("tm.expm1({0})", "libdevice.expm1({0})"),
    "tanh": ("tm.tanh({0})", "libdevice.tanh({0})"),
    "sigmoid": ("tl.sigmoid({0})", "tl.sigmoid({0})"),
    "rsqrt": ("tl.rsqrt({0})", "tl.rsqrt({0})"),
    "floor": ("tl.floor({0})", "tl.floor({0})"),
    "ceil": ("tl.ceil({0})", "tl.ceil({0})"),
    "round": ("tm.round_half_even({0})", "libdevice.rint({0})"),
    "trunc": ("tm.trunc({0})", "libdevice.trunc({0})"),
    "sin": ("tl.sin({0})", "libdevice.sin({0})"),
    "cos": ("tl.cos({0})", "libdevice.cos({0})"),
    "erf": ("tl.erf({0})", "tl.erf({0})"),
    "erfc": ("tm.erfc({0})", "libdevice.erfc({0})"),
    "log10": ("tl.log({0}) * 0.4342944819032518", "libdevice.log10({0})"),
    **{
        f: (f"tm.{f}({{0}})", f"libdevice.{f}({{0}})")
        for f in ["tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh"]
    },
    "logical_not": ("({0} == 0)", "({0} == 0)"),
}
# Binary functions: (interpreter helper, GPU function); operands are passed as tensors.
_BINARY_CALLS = {
    "atan2": ("tm.atan2", "libdevice.atan2"),
    "hypot": ("tm.hypot", "libdevice.hypot"),
    "copysign": ("tm.copysign", "libdevice.copysign"),
}
# Where a value decides a mask bit, an index or an integer (``exact_nodes``), GPUs use the accurate
# libdevice / IEEE forms instead of the fast approximations above.
_ACCURATE_GPU = {
    "exp": "libdevice.exp({0})",
    "exp2": "libdevice.exp2({0})",
    "log": "libdevice.log({0})",
    "log2": "libdevice.log2({0})",
    "rsqrt": "libdevice.rsqrt({0})",
    "sqrt": "tl.sqrt_rn({0})",
    "sigmoid": "tl.div_rn(tl.full((), 1.0, tl.float32), 1.0 + libdevice.exp(-{0}))",
}
_INFIX = {
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "eq": "==",
    "ne": "!=",
    "and": "&",
    "or": "|",
    "xor": "^",
    "lshift": "<<",
    "rshift": ">>",
    "logical_and": "&",
    "logical_or": "|",
    "logical_xor": "^",
    "sub": "-",
}


def _literal(value, dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "True" if value else "False"
    if dtype.is_floating_point:
        value = float(value)
        if value != value:
            return 'float("nan")'
        if value in (float("inf"), float("-inf")):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return repr(value)
    return str(int(value))


class Emitter:
    """Emits the body of one device function, one line per IR node.

    ``tile_origin``: the function also takes ``q_lo, kv_lo``, the raw positions of the tile's first
    row and column (``kernels/mods.py``, TILE_GRAD_FN); the gradients of diagonal gathers
    (``compiler/diagonals.py``) then go through ``diagonal_branch``.
    """

    def __init__(
        self, graph: Graph, target: str, output: int, fast_math: bool = False, tile_origin: bool = False
    ) -> None:
        self.graph = graph
        self.fast_math = fast_math and target == "cuda"  # hardware tanh (fast_math.md); NVIDIA only
        self.exact = exact_nodes(graph, output)
        self.gpu = target != "interpreter"
        self.target = target
        self.dims = tile_dims(graph)
        self.nonneg = non_negative(graph)
        self.layouts = capture_layouts(graph)
        self.lines: list[str] = []
        self.emitted: set[int] = set()
        self.prologue: set[str] = set()
        self.diagonals = diagonal_loads(graph, range(len(graph.nodes))) if tile_origin else {}

    # operands
    def ref(self, i: int) -> str:
        node = self.graph.nodes[i]
        if node.op == "const":
            if node.dtype in (torch.float32, torch.bool) or (
                node.dtype == torch.int32 and -(2**31) <= node.value < 2**31
            ):
                return _literal(node.value, node.dtype)
            return self.tensor(i)
        if node.op in INPUTS or node.op == "dout":
            return node.op
        return f"v{i}"

    def tensor(self, i: int) -> str:
        """An expression that is a Triton tensor (constants become ``tl.full``)."""
        node = self.graph.nodes[i]
        if node.op == "const":
            return f"tl.full((), {_literal(node.value, node.dtype)}, {TL_DTYPES[node.dtype]})"
        return self.ref(i)

    def f32(self, i: int) -> str:
        node = self.graph.nodes[i]
        if node.op == "const" and node.dtype.is_floating_point:
            return _literal(node.value, torch.float32)
        return f"{self.ref(i)}.to(tl.float32)"

    def is_const(self, i: int, value=None) -> bool:
        node = self.graph.nodes[i]
        return node.op == "const" and (value is None or node.value == value)

    # statements
    def emit(self, indices) -> None:
        for i in indices:
            node = self.graph.nodes[i]
            if i in self.emitted or node.op in ("const", "dout") or node.op in INPUTS:
                continue
            self.emitted.add(i)
            if node.op == "load":
                self._emit_load(i)
            elif node.op == "search":
                self._emit_search(i)
            else:
                self.lines.append(f"v{i} = {self._expr(i)}")

    def capture_names(self, slot: int) -> tuple[str, list[str], list[str]]:
        layout = self.layouts[slot]
        ptr, sizes, strides = capture_symbols(slot, layout.ndim)
        if ptr not in self.prologue:
            self.prologue.add(ptr)
            self.lines += unpack_capture("caps", layout.base, ptr, sizes, strides, layout.wide)
        return ptr, sizes, strides

    def index_terms(self, i: int) -> list[tuple[str, bool]]:
        """Wrapped indices of load ``i`` as (expression, is_constant), emitting them once."""
        return [self.index_term(i, d) for d in range(len(self.graph.nodes[i].args))]

    def index_term(self, i: int, d: int) -> tuple[str, bool]:
        """The wrapped index ``d`` of load ``i`` as (expression, is_constant), emitted once."""
        node = self.graph.nodes[i]
        a = node.args[d]
        self.emit(self.graph.live([a]))
        _, sizes, _ = self.capture_names(node.value)
        if self.is_const(a):
            value = self.graph.nodes[a].value
            return (str(value) if value >= 0 else f"({sizes[d]} - {-value})", True)
        name = f"c{node.value}_i{d}_v{a}"  # shared by every load of this capture with this index
        if name not in self.emitted:
            self.emitted.add(name)
            helper = "tm.clamp_index" if self.nonneg[a] else "tm.wrap_index"
            width = "tl.int64" if self.layouts[node.value].wide else "tl.int32"
            self.lines.append(self._index_assert(node.value, d, a, sizes[d]))
            self.lines.append(f"{name} = {helper}({self.ref(a)}, {sizes[d]}).to({width})")
        return (name, False)

    def _index_assert(self, slot: int, dim: int, index: int, size: str) -> str:
        """A device-side check that the index lies in [-n, n) (compiled only under TRITON_DEBUG=1;
        otherwise the index is clamped, see compiler/index_ranges.py)."""
        i = self.ref(index)
        inside = f"{i} < {size}" if self.nonneg[index] else f"({i} >= -{size}) & ({i} < {size})"
        return f'tl.device_assert({inside}, "flexattn: mod index out of range (capture {slot}, dim {dim})")'

    def offset(self, i: int, strides: list[str]) -> str:
        terms = [f"{idx} * {stride}" for (idx, _), stride in zip(self.index_terms(i), strides)]
        return " + ".join(terms)

    def _emit_load(self, i: int) -> None:
        node = self.graph.nodes[i]
        ptr, _, strides = self.capture_names(node.value)
        offset = self.offset(i, strides)
        self.lines.append(f"v{i} = tl.load({ptr} + {offset})" if offset else f"v{i} = tl.load({ptr})")

    def diagonal_branch(self, i: int, strides: list[str], fast, general) -> None:
        """Emit ``if <every index of the tile inside the tensor>: fast(others, d0) else: general()``.

        ``fast`` returns the fast branch's lines given the names of the scalar offset of the other
        (tile-invariant) indices for ``strides`` and of the tile's diagonal index d0; ``general()``
        emits the element-wise code, whose names stay local to its branch (later uses emit them
        again).
        """
        node, diag = self.graph.nodes[i], self.diagonals[i]
        _, sizes, _ = self.capture_names(node.value)
        others = [
            f"{self.index_term(i, d)[0]} * {strides[d]}" for d in range(len(node.args)) if d != diag.dim
        ]
        rest = ""
        for coef, term in diag.rest:
            self.emit(self.graph.live([term]))
            rest += f" {'+' if coef > 0 else '-'} {self.ref(term)}"
        tag = f"{i}_{len(self.lines)}"  # unique: a gradient function may branch on the same load twice
        d0, base, ok = f"d{tag}", f"o{tag}", f"f{tag}"
        relative = "kv_lo - q_lo" if diag.sign > 0 else "q_lo - kv_lo"
        self.lines.append(f"{d0} = {relative}{rest}")
        self.lines.append(f"{base} = {' + '.join(others) if others else '0'}")
        self.lines.append(f"{ok} = td.in_range({d0}, {sizes[diag.dim]}, q_idx, kv_idx, {diag.sign})")
        lines, emitted = self.lines, set(self.emitted)
        self.lines = []
        fast_lines = fast(base, d0)
        general()
        general_lines, self.lines, self.emitted = self.lines, lines, emitted
        self.lines += [f"if {ok}:", *[f"    {line}" for line in fast_lines], "else:"]
        self.lines += [f"    {line}" for line in general_lines]

    def _emit_search(self, i: int) -> None:
        """torch.searchsorted over a sorted 1-D capture: a binary search per element."""
        node = self.graph.nodes[i]
        (slot, right), (v,) = node.value, node.args
        ptr, sizes, strides = self.capture_names(slot)
        found = f"tm.searchsorted({ptr}, {sizes[0]}, {strides[0]}, {self.tensor(v)}, {right})"
        self.lines.append(f"v{i} = {found}.to({TL_DTYPES[node.dtype]})")

    def _expr(self, i: int) -> str:
        node = self.graph.nodes[i]
        op, args, dtype = node.op, node.args, node.dtype
        if op == "cast":
            if dtype == torch.bool:
                return f"{self.ref(args[0])} != 0"
            return f"{self.ref(args[0])}.to({TL_DTYPES[dtype]})"
        if op == "detach":
            return self.ref(args[0])
        if op == "where":
            return f"tl.where({self.ref(args[0])}, {self.ref(args[1])}, {self.ref(args[2])})"
        low = dtype in LOW_PRECISION and op in _OPMATH
        compute = torch.float32 if low else dtype
        operands = [self.f32(a) if low else self.ref(a) for a in args]
        expr = self._compute(i, op, args, operands, compute)
        return f"({expr}).to({TL_DTYPES[dtype]})" if low else expr

    def _compute(self, i: int, op: str, args, x: list[str], dtype: torch.dtype) -> str:
        is_float = dtype.is_floating_point
        if self.gpu and i in self.exact and op in _ACCURATE_GPU and dtype == torch.float32:
            return _ACCURATE_GPU[op].format(x[0])
        if op == "tanh" and self.fast_math and i not in self.exact and dtype == torch.float32:
            return f"tm.fast_tanh({x[0]})"  # relative error <= 2**-11: see docs/kernel_options.md
        if op in _UNARY and (op == "logical_not" or dtype != torch.bool):
            return _UNARY[op][self.gpu].format(x[0])
        if op == "fast_tanh":
            if self.target == "cuda" and dtype == torch.float32:
                return f"tm.fast_tanh({x[0]})"
            return _UNARY["tanh"][self.gpu].format(x[0])
        if op == "sqrt":
            return f"tl.sqrt({x[0]})"
        if op == "signbit":
            return f"tm.signbit({x[0]})"
        if op in _BINARY_CALLS:
            return f"{_BINARY_CALLS[op][self.gpu]}({self._ts(args, x)})"
        if op == "fmod":  # Triton's % is C's fmod on floats and truncating on integers, like torch.fmod
            return f"{x[0]} % {x[1]}"
        if op in ("fmax", "fmin") and is_float:
            return f"tm.{op}({self._ts(args, x)})"
        if op in ("fmax", "fmin"):
            op = "maximum" if op == "fmax" else "minimum"
        if op in ("lshift", "rshift"):
            return self._shift(op, args, x, dtype)
        if op == "invert":
            return f"~{x[0]}"
        if op == "add":
            return f"{x[0]} | {x[1]}" if dtype == torch.bool else f"{x[0]} + {x[1]}"
        if op == "mul":
            return f"{x[0]} & {x[1]}" if dtype == torch.bool else f"{x[0]} * {x[1]}"
        if (
            op in COMPARISONS
            and not self.gpu
            and not self.dims[i]
            and self.graph.nodes[args[0]].dtype.is_floating_point
        ):
            # Triton's interpreter tags a 0-dim float comparison as float, which breaks `&` and `|`
            return f"({x[0]} {_INFIX[op]} {x[1]}).to(tl.int32) != 0"
        if op in _INFIX:
            return f"{x[0]} {_INFIX[op]} {x[1]}"
        if op == "truediv":
            return self._divide(i, args, x, dtype)
        if op == "floordiv":
            if not is_float:
                nonneg = self.nonneg[args[0]] and self.nonneg[args[1]]
                return f"{x[0]} // {x[1]}" if nonneg else f"tm.floordiv({self._ts(args, x)})"
            return f"tm.floordiv_float({self._ts(args, x)})"
        if op == "mod":
            if not is_float and self.nonneg[args[0]] and self.nonneg[args[1]]:
                return f"{x[0]} % {x[1]}"
            return f"tm.remainder({self._ts(args, x)})"
        if op == "pow":
            return self._power(args, x, dtype)
        if op in ("maximum", "minimum"):
            if dtype == torch.bool:
                return f"{x[0]} {'|' if op == 'maximum' else '&'} {x[1]}"
            nan = ", propagate_nan=tl.PropagateNan.ALL" if is_float else ""
            return f"tl.{op}({x[0]}, {x[1]}{nan})"
        if op == "clamp_min":
            return f"tl.where({x[0]} < {x[1]}, {x[1]}, {x[0]})"
        if op == "clamp_max":
            return f"tl.where({x[0]} > {x[1]}, {x[1]}, {x[0]})"
        raise NotImplementedError(f"no Triton lowering for IR op {op!r}")

    def _shift(self, op: str, args, x: list[str], dtype: torch.dtype) -> str:
        """Shifts as torch defines them for every count: by a negative count or one of at least the
        bit width, ``<<`` gives 0 and ``>>`` the sign fill (0 for unsigned); Triton leaves it undefined."""
        bits = torch.iinfo(dtype).bits if dtype != torch.bool else 1
        shifted = f"{x[0]} {_INFIX[op]} {x[1]}"
        count = self.graph.nodes[args[1]]
        if op == "lshift" or dtype == torch.uint8:
            overflow = f"{x[0]} * 0"
        else:
            overflow = f"{x[0]} >> {bits - 1}"
        if count.op == "const":
            return shifted if 0 <= count.value < bits else overflow
        return f"tl.where(({x[1]} < 0) | ({x[1]} >= {bits}), {overflow}, {shifted})"

    def _t(self, i: int, expr: str) -> str:
        """``expr`` as a tensor (helpers need tensors, not Python literals)."""
        node = self.graph.nodes[i]
        if node.op != "const":
            return expr
        dtype = torch.float32 if node.dtype in LOW_PRECISION else node.dtype
        return f"tl.full((), {_literal(node.value, dtype)}, {TL_DTYPES[dtype]})"

    def _ts(self, args, x: list[str]) -> str:
        """All operands as tensors, comma-separated (for helper calls)."""
        return ", ".join(self._t(a, e) for a, e in zip(args, x))

    def _divide(self, i: int, args, x: list[str], dtype: torch.dtype) -> str:
        """Float division, bit-compatible with eager PyTorch on the target's device where it matters.

        Eager CUDA divides by a Python number as ``x * (1 / c)`` (PyTorch's scalar-divisor kernel),
        eager CPU divides exactly. Where the quotient decides a mask bit, an index or an integer
        (``exact_nodes``) the code does the same as eager on its device, so kernels agree with a
        block mask built eagerly; elsewhere it takes the fast forms (reciprocal, Triton's ``/``).
        """
        divisor = self.graph.nodes[args[1]]
        exact = i in self.exact
        if divisor.op == "const" and divisor.value != 0 and math.isfinite(divisor.value):
            power_of_two = math.frexp(abs(float(divisor.value)))[0] == 0.5
            if power_of_two or self.gpu or not exact:
                if dtype == torch.float64:
                    return f"{x[0]} * tl.full((), {1.0 / float(divisor.value)!r}, tl.float64)"
                reciprocal = (torch.ones((), dtype=torch.float32) / float(divisor.value)).item()  # as CUDA
                return f"{x[0]} * {_literal(reciprocal, torch.float32)}"
        if dtype == torch.float32 and exact:
            return f"tl.div_rn({x[0]}, {self._t(args[1], x[1])})"
        return f"{x[0]} / {x[1]}"

    def _power(self, args, x: list[str], dtype: torch.dtype) -> str:
        exponent = self.graph.nodes[args[1]]
        if exponent.op == "const":
            e = exponent.value
            if not dtype.is_floating_point or (float(e).is_integer() and 0 <= e <= 4):
                if e == 0:
                    return f"tl.where({x[0]} == {x[0]}, 1, 1).to({TL_DTYPES[dtype]})"
                return " * ".join([x[0]] * int(e))
            special = {
                0.5: "tl.sqrt_rn({0})" if dtype == torch.float32 else "tl.sqrt({0})",
                -0.5: "tl.rsqrt({0})",
                -1.0: "tl.div_rn(tl.full((), 1.0, tl.float32), {0})"
                if dtype == torch.float32
                else "1.0 / {0}",
            }
            if e in special:
                return special[e].format(x[0])
        if not dtype.is_floating_point:
            return f"tm.ipow({self._ts(args, x)})"
        pow_fn = "libdevice.pow" if self.gpu else "tm.pow"
        return f"{pow_fn}({self._ts(args, x)})"


def capture_symbols(slot: int, ndim: int) -> tuple[str, list[str], list[str]]:
    """The names generated code gives captured tensor ``slot``: pointer, sizes, strides."""
    return f"c{slot}", [f"c{slot}_n{d}" for d in range(ndim)], [f"c{slot}_s{d}" for d in range(ndim)]


def unpack_capture(
    tuple_name: str, base: int, ptr: str, sizes: list[str], strides: list[str], wide: bool
) -> list[str]:
    """Lines reading one captured tensor's pointer, sizes (int32) and strides from the tuple."""
    lines = [f"{ptr} = {tuple_name}[{base}]"]
    k = base + 1
    for names, helper in ((sizes, "tm.arg_i32"), (strides, "tm.arg_i64" if wide else "tm.arg_i32")):
        if names:
            values = ", ".join(f"{helper}({tuple_name}[{k + j}])" for j in range(len(names)))
            lines.append(f"{', '.join(names)} = {values}")
            k += len(names)
    return lines
