"""Tracing: run a mod once on symbolic per-element values and record what it computes.

Each input of the mod becomes a ``Traced`` proxy: a stand-in for a 0-dim tensor (the view a mod
has under ``torch.func.vmap``). Python operators on proxies and torch functions reached through
``__torch_function__`` (plus a ``TorchFunctionMode`` for constant factories such as
``torch.tensor(2.0)``) append typed nodes to a ``Graph``. Indexing a captured tensor with proxies
records a ``load``; indexing with fewer indices than dimensions gives a ``PartialIndex`` that
accumulates further indices (``iv = intervals[img[kv_idx]]; iv[0]``), as vmap would.

Result dtypes follow PyTorch exactly: every op first runs on dummy 0-dim tensors of the operands'
dtypes (Python numbers stay Python numbers), so promotion and "not implemented for 'Float'" errors
are PyTorch's own. Anything outside the supported surface raises ``ModCompileError`` naming the
user's source line, with a hint.
"""

from __future__ import annotations

import functools
import linecache
import os
import sys
import threading
from dataclasses import dataclass
from numbers import Number

import torch
from torch.overrides import TorchFunctionMode

from flexattn.compiler.ir import COMPARISONS, INPUTS, LOGICAL, LOW_PRECISION, OP_TORCH, Graph, Node

_COMPILER_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_STATE = threading.local()


class ModCompileError(Exception):
    """A mod uses something the compiler cannot turn into kernel code (message has line + hint)."""


@dataclass
class Program:
    """A traced mod: the pruned graph, its single output and the mod's kind ("score"/"mask")."""

    graph: Graph
    output: int
    kind: str
    name: str


def fast_tanh(x):
    """``tanh(x)``, computed in kernels with the fast hardware approximation.

    Eager PyTorch (and the reference backend) evaluates ``torch.tanh``; inside compiled kernels on
    NVIDIA GPUs it becomes one ``tanh.approx.f32`` instruction (max relative error about 2**-11),
    and the exact tanh in Triton's interpreter. Use it in score mods where speed matters more than
    the last bits, e.g. a tanh soft-cap::

        def softcap(score, b, h, q_idx, kv_idx):
            return 30.0 * fast_tanh(score / 30.0)
    """
    if isinstance(x, Traced):
        return _unary("fast_tanh", x)
    return torch.tanh(x)


# --- errors -----------------------------------------------------------------------------------


def _user_location() -> str:
    """``file:line`` and source text of the innermost frame outside flexattn.compiler and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((_COMPILER_DIR, _TORCH_DIR)):
            line = linecache.getline(filename, frame.f_lineno).strip()
            return f"{frame.f_code.co_filename}:{frame.f_lineno}" + (f"\n    {line}" if line else "")
        frame = frame.f_back
    return "<unknown location>"


def refuse(what: str, hint: str) -> ModCompileError:
    """Build the error for an unsupported construct at the user's current source line."""
    name = getattr(_STATE, "mod_name", "mod")
    return ModCompileError(f"{name}: {what}\n  at {_user_location()}\n  hint: {hint}")


# --- proxies ------------------------------------------------------------------------------------


def _graph() -> Graph:
    graph = getattr(_STATE, "graph", None)
    if graph is None:
        raise ModCompileError("a traced value was used after its mod finished tracing")
    return graph


def _tensor_fn(func, types, args=(), kwargs=None):
    return _call(func, args, kwargs or {})


class Traced:
    """A per-element value inside a traced mod (behaves like a 0-dim tensor)."""

    __slots__ = ("graph", "node")
    __torch_function__ = classmethod(_tensor_fn)
    shape = torch.Size([])
    ndim = 0
    is_cuda = False
    requires_grad = False

    def __init__(self, graph: Graph, node: int) -> None:
        self.graph = graph
        self.node = node

    @property
    def dtype(self) -> torch.dtype:
        return self.graph.nodes[self.node].dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 0

    def size(self, dim=None):
        if dim is not None:
            raise refuse(f"size({dim}) of a per-element value (it is 0-dim)", "mods see 0-dim tensors")
        return torch.Size([])

    def numel(self) -> int:
        return 1

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        node = self.graph.nodes[self.node]
        return f"Traced(%{self.node} {node.op}, dtype={self.dtype})"

    # Python operators
    def __add__(self, o):
        return _binary("add", self, o)

    def __radd__(self, o):
        return _binary("add", o, self)

    def __sub__(self, o):
        return _binary("sub", self, o)

    def __rsub__(self, o):
        return _binary("sub", o, self)

    def __mul__(self, o):
        return _binary("mul", self, o)

    def __rmul__(self, o):
        return _binary("mul", o, self)

    def __truediv__(self, o):
        return _binary("truediv", self, o)

    def __rtruediv__(self, o):
        return _binary("truediv", o, self)

    def __floordiv__(self, o):
        return _binary("floordiv", self, o)

    def __rfloordiv__(self, o):
        return _binary("floordiv", o, self)

    def __mod__(self, o):
        return _binary("mod", self, o)

    def __rmod__(self, o):
        return _binary("mod", o, self)

    def __pow__(self, o):
        return _binary("pow", self, o)

    def __rpow__(self, o):
        return _binary("pow", o, self)

    def __and__(self, o):
        return _binary("and", self, o)

    def __rand__(self, o):
        return _binary("and", o, self)

    def __or__(self, o):
        return _binary("or", self, o)

    def __ror__(self, o):
        return _binary("or", o, self)

    def __xor__(self, o):
        return _binary("xor", self, o)

    def __rxor__(self, o):
        return _binary("xor", o, self)

    def __lshift__(self, o):
        return _binary("lshift", self, o)

    def __rlshift__(self, o):
        return _binary("lshift", o, self)

    def __rshift__(self, o):
        return _binary("rshift", self, o)

    def __rrshift__(self, o):
        return _binary("rshift", o, self)

    def __lt__(self, o):
        return _binary("lt", self, o)

    def __le__(self, o):
        return _binary("le", self, o)

    def __gt__(self, o):
        return _binary("gt", self, o)

    def __ge__(self, o):
        return _binary("ge", self, o)

    def __eq__(self, o):
        return _binary("eq", self, o)

    def __ne__(self, o):
        return _binary("ne", self, o)

    __hash__ = object.__hash__

    def __neg__(self):
        return _unary("neg", self)

    def __pos__(self):
        return self

    def __abs__(self):
        return _unary("abs", self)

    def __invert__(self):
        return _unary("invert", self)

    def __round__(self, ndigits=None):
        if ndigits:
            raise refuse("round(x, ndigits)", "only round(x) is supported")
        return _unary("round", self)

    # Things a per-element value cannot do at trace time
    def __bool__(self):
        raise refuse(
            "data-dependent Python control flow on a traced value (`if`, `and`/`or`/`not`, "
            "`max()`/`min()`, chained comparisons, ...)",
            "use torch.where(cond, a, b), torch.maximum/minimum, or `&`/`|`/`~` on masks",
        )

    def _no_python_number(self, *_):
        raise refuse(
            "converting a traced value to a Python number (`.item()`, `int(t)`, `float(t)`, `math.*`)",
            "keep it a tensor: use torch functions (torch.exp, torch.floor, .to(torch.int32), ...)",
        )

    __int__ = __float__ = __index__ = __complex__ = item = tolist = numpy = _no_python_number

    def __len__(self):
        raise refuse(
            "len() of a per-element value (mods see 0-dim tensors)", "index captured tensors instead"
        )

    def __iter__(self):
        raise refuse("iterating over a per-element value (mods see 0-dim tensors)", "index captured tensors")

    def __getitem__(self, index):
        raise refuse(
            "indexing a per-element value (score, b, h, q_idx, kv_idx and values computed from them are 0-dim)",
            "index captured tensors with them instead, e.g. bias[h, q_idx]",
        )

    def __setitem__(self, index, value):
        raise _in_place("item assignment")

    def _in_place_operator(self, *_):
        raise _in_place("an augmented assignment (`+=`, `*=`, ...)")

    __iadd__ = __isub__ = __imul__ = __itruediv__ = __ifloordiv__ = __imod__ = _in_place_operator
    __ipow__ = __iand__ = __ior__ = __ixor__ = __ilshift__ = __irshift__ = _in_place_operator

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return functools.partial(_method, name, self)


class PartialIndex:
    """A captured tensor indexed by fewer indices than it has dimensions (a row of a table)."""

    def __init__(self, tensor: torch.Tensor, indices: tuple[int, ...]) -> None:
        self.tensor = tensor
        self.indices = indices

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call(func, args, kwargs or {})

    def __getitem__(self, index):
        return _gather(self.tensor, self.indices, index)

    def _refuse(self, *_, **__):
        got, ndim = len(self.indices), self.tensor.ndim
        raise refuse(
            f"a captured tensor of shape {tuple(self.tensor.shape)} indexed with {got} of its {ndim} indices "
            "was used as a value (per element it would be a whole row, not a number)",
            "index every dimension, e.g. table[i][0] or table[i, 0]",
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __and__ = __or__ = __bool__ = _refuse
    __hash__ = object.__hash__


# --- converting operands -----------------------------------------------------------------------


def _untraced(fn):
    """Run a tracer internal with torch functions undispatched (the trace mode stays out of it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return wrapper


_DTYPES = {t: t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _in_place(what: str) -> ModCompileError:
    return refuse(f"in-place operation ({what})", "write it out of place, e.g. `score = score + bias`")


def _as_number(x):
    """Python numbers (and numpy scalars) as plain bool/int/float, else None."""
    if isinstance(x, bool | int | float):
        return x
    if isinstance(x, Number) and hasattr(x, "item"):
        return x.item()
    return None


@_untraced
def _operand(x) -> Traced | bool | int | float:
    """A proxy or a Python number; captured 0-dim tensors become loads."""
    if isinstance(x, Traced):
        return x
    number = _as_number(x)
    if number is not None:
        return number
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            graph = _graph()
            slot = graph.capture(x)
            return Traced(graph, graph.add(Node("load", (), x.dtype, slot)))
        raise refuse(
            f"a captured tensor of shape {tuple(x.shape)} was used as a per-element value",
            "index it with b, h, q_idx, kv_idx (e.g. bias[h, q_idx]) so each element reads one number",
        )
    if isinstance(x, PartialIndex):
        x._refuse()
    raise refuse(f"unsupported operand of type {type(x).__name__}", "use tensors, proxies or Python numbers")


def _dummy(x):
    return torch.ones((), dtype=x.dtype) if isinstance(x, Traced) else x


@functools.lru_cache(maxsize=4096)
def _result_dtype_cached(op: str, signature: tuple) -> torch.dtype:
    dummies = [torch.ones((), dtype=s) if isinstance(s, torch.dtype) else s[1] for s in signature]
    return OP_TORCH[op](*dummies).dtype


def _result_dtype(op: str, *xs) -> torch.dtype:
    """PyTorch's result dtype for ``op`` on these operands (0-dim tensors and Python numbers)."""
    signature = tuple(
        x if isinstance(x, torch.dtype) else x.dtype if isinstance(x, Traced) else (type(x), x) for x in xs
    )
    try:
        return _result_dtype_cached(op, signature)
    except Exception as e:  # PyTorch's own refusal, e.g. bitwise ops on floats
        raise refuse(f"torch rejects this operation: {e}", "check the operand dtypes") from None


def _node(x, dtype: torch.dtype, opmath: bool = False) -> int:
    """The node for operand ``x`` converted to ``dtype`` (numbers become constants)."""
    graph = _graph()
    if isinstance(x, Traced):
        return graph.cast(x.node, dtype)
    if opmath and dtype in LOW_PRECISION:
        return graph.const(x, torch.float32)
    return graph.const(x, dtype)


def _new(op: str, args: tuple[int, ...], dtype: torch.dtype) -> Traced:
    graph = _graph()
    return Traced(graph, graph.add(Node(op, args, dtype)))


# --- ops -----------------------------------------------------------------------------------------


@_untraced
def _binary(op: str, a, b) -> Traced:
    a, b = _operand(a), _operand(b)
    dtype = _result_dtype(op, a, b)
    if op in COMPARISONS:
        compute = torch.result_type(_dummy(a), _dummy(b))
        return _new(op, (_node(a, compute), _node(b, compute)), torch.bool)
    if op in LOGICAL:
        return _new(op, (_node(a, torch.bool), _node(b, torch.bool)), torch.bool)
    return _new(op, (_node(a, dtype, True), _node(b, dtype, True)), dtype)


@_untraced
def _unary(op: str, x) -> Traced:
    x = _operand(x)
    if not isinstance(x, Traced):
        return _unary(op, Traced(_graph(), _node(x, torch.tensor(x).dtype)))
    dtype = _result_dtype(op, x)
    if op in ("floor", "ceil", "round", "trunc") and not dtype.is_floating_point:
        return x
    if op in LOGICAL:
        return _new(op, (_node(x, torch.bool),), torch.bool)
    if op == "invert" and dtype == torch.bool:
        return _new("logical_not", (x.node,), torch.bool)
    return _new(op, (_node(x, dtype),), dtype)


@_untraced
def _where(cond, a, b) -> Traced:
    cond, a, b = _operand(cond), _operand(a), _operand(b)
    if isinstance(cond, Traced) and cond.dtype != torch.bool:
        raise refuse(f"torch.where condition of dtype {cond.dtype}", "compare to get a bool, e.g. x != 0")
    dtype = _result_dtype("where", torch.bool, a, b)
    return _new("where", (_node(cond, torch.bool), _node(a, dtype), _node(b, dtype)), dtype)


@_untraced
def _cast(x, dtype: torch.dtype) -> Traced:
    x = _operand(x)
    if not isinstance(x, Traced):
        x = Traced(_graph(), _node(x, torch.tensor(x).dtype))
    graph = _graph()
    if dtype == torch.bool and x.dtype != torch.bool:
        return _binary("ne", x, 0)
    return Traced(graph, graph.cast(x.node, dtype))


@_untraced
def _clamp(x, min=None, max=None) -> Traced:  # noqa: A002 (torch's keyword names)
    lo, hi = min, max
    if lo is None and hi is None:
        raise refuse("clamp() without bounds", "pass min= and/or max=")
    operands = [_operand(v) for v in (x, lo, hi) if v is not None]
    dtype = torch.result_type(*[_dummy(o) for o in operands[:2]])
    if len(operands) == 3:
        dtype = torch.promote_types(dtype, torch.result_type(_dummy(operands[0]), _dummy(operands[2])))
    out = Traced(_graph(), _node(operands[0], dtype))
    if lo is not None:
        out = _new("clamp_min", (out.node, _node(_operand(lo), dtype, True)), dtype)
    if hi is not None:
        out = _new("clamp_max", (out.node, _node(_operand(hi), dtype, True)), dtype)
    return out


@_untraced
def _constant_like(x, value, dtype=None, **_) -> Traced:
    x = _operand(x)
    dtype = dtype or (x.dtype if isinstance(x, Traced) else torch.tensor(x).dtype)
    return Traced(_graph(), _graph().const(value, dtype))


@_untraced
def _factory_constant(data, dtype=None, **_) -> Traced:
    number = _as_number(data)
    dtype = dtype or torch.tensor(number).dtype
    return Traced(_graph(), _graph().const(number, dtype))


# --- gathers from captured tensors ---------------------------------------------------------------


@_untraced
def _gather(tensor: torch.Tensor, prefix: tuple[int, ...], index) -> Traced | PartialIndex:
    """``tensor[prefix..., index...]`` with per-element indices: a load, or a partial index."""
    graph = _graph()
    items = index if isinstance(index, tuple) else (index,)
    nodes = list(prefix)
    for item in items:
        if item is None or item is Ellipsis or isinstance(item, slice | list):
            raise refuse(
                f"indexing a captured tensor with {item!r} (per element, that gives a vector, not a number)",
                "index with integers or int tensors computed from b, h, q_idx, kv_idx",
            )
        if isinstance(item, torch.Tensor) and not isinstance(item, Traced) and item.ndim > 0:
            raise refuse(
                "indexing a captured tensor with a non-scalar tensor (data-dependent shape)",
                "index with b, h, q_idx, kv_idx or values computed from them",
            )
        item = _operand(item)
        if isinstance(item, Traced):
            if item.dtype == torch.bool or item.dtype == torch.uint8:
                raise refuse(
                    "boolean-mask indexing of a captured tensor (data-dependent shape)",
                    "use torch.where(cond, table[i], other) instead",
                )
            if item.dtype.is_floating_point:
                raise refuse(
                    f"indexing with a {item.dtype} value", "convert the index with .long() or .int()"
                )
            nodes.append(item.node)
        elif isinstance(item, bool) or not isinstance(item, int):
            raise refuse(f"indexing a captured tensor with {item!r}", "use an integer index")
        else:
            nodes.append(graph.const(item, torch.int64))
    if len(nodes) > tensor.ndim:
        raise refuse(
            f"{len(nodes)} indices for a captured tensor of shape {tuple(tensor.shape)}", "check the indexing"
        )
    if len(nodes) < tensor.ndim:
        return PartialIndex(tensor, tuple(nodes))
    slot = graph.capture(tensor)
    return Traced(graph, graph.add(Node("load", tuple(nodes), tensor.dtype, slot)))


# --- dispatch of torch functions and Tensor methods ------------------------------------------------


def _swap(op):
    return lambda a, b, *rest, **kw: _binary(op, b, a)


def _add(a, b, *, alpha=1):
    return _binary("add", a, b if alpha == 1 else _binary("mul", b, alpha))


def _sub(a, b, *, alpha=1):
    return _binary("sub", a, b if alpha == 1 else _binary("mul", b, alpha))


def _div(a, b, *, rounding_mode=None):
    if rounding_mode is None:
        return _binary("truediv", a, b)
    if rounding_mode == "floor":
        return _binary("floordiv", a, b)
    quotient = _binary("truediv", a, b)
    result_dtype = _result_dtype("floordiv", _operand(a), _operand(b))
    return _cast(_unary("trunc", quotient), result_dtype)


def _method_to(x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, Traced | torch.Tensor):
            dtype = a.dtype
    return x if dtype is None else _cast(x, dtype)


def _round(x, *, decimals=0):
    if decimals:
        raise refuse("round(decimals=...)", "scale explicitly: torch.round(x * 100) / 100")
    return _unary("round", x)


def _new_constant(x, size, value, dtype=None, **_):
    if tuple(size) != ():
        raise refuse(
            f"a new tensor of shape {tuple(size)} inside a mod", "mods compute one 0-dim value per element"
        )
    return _constant_like(x, value, dtype=dtype)


def _isnan(x):
    return _binary("ne", x, x)


def _isinf(x):
    return _binary("eq", _unary("abs", x), float("inf"))


def _isfinite(x):
    return _binary("lt", _unary("abs", x), float("inf"))


def _binary_max(op):
    def handler(a, b=None, *rest, **kwargs):
        if b is None or rest or kwargs:
            raise refuse(f"torch.{op[:3]} as a reduction", f"use torch.{op}(a, b) for two values")
        return _binary(op, a, b)

    return handler


def _identity(x, *args, **kwargs):
    return _operand(x)


_CASTS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int": torch.int32,
    "long": torch.int64,
    "short": torch.int16,
    "bool": torch.bool,
}
_UNARY = {
    "neg": "neg",
    "negative": "neg",
    "__neg__": "neg",
    "abs": "abs",
    "absolute": "abs",
    "__abs__": "abs",
    "sign": "sign",
    "sgn": "sign",
    "exp": "exp",
    "exp2": "exp2",
    "special_exp2": "exp2",
    "log": "log",
    "log2": "log2",
    "log1p": "log1p",
    "special_log1p": "log1p",
    "expm1": "expm1",
    "special_expm1": "expm1",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "special_expit": "sigmoid",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "floor": "floor",
    "ceil": "ceil",
    "trunc": "trunc",
    "fix": "trunc",
    "sin": "sin",
    "cos": "cos",
    "erf": "erf",
    "special_erf": "erf",
    "bitwise_not": "invert",
    "__invert__": "invert",
    "logical_not": "logical_not",
}
_BINARY = {
    "add": "add",
    "__add__": "add",
    "sub": "sub",
    "subtract": "sub",
    "__sub__": "sub",
    "mul": "mul",
    "multiply": "mul",
    "__mul__": "mul",
    "true_divide": "truediv",
    "__truediv__": "truediv",
    "floor_divide": "floordiv",
    "__floordiv__": "floordiv",
    "remainder": "mod",
    "__mod__": "mod",
    "pow": "pow",
    "__pow__": "pow",
    "maximum": "maximum",
    "minimum": "minimum",
    "fmax": "maximum",
    "fmin": "minimum",
    "lt": "lt",
    "less": "lt",
    "__lt__": "lt",
    "le": "le",
    "less_equal": "le",
    "__le__": "le",
    "gt": "gt",
    "greater": "gt",
    "__gt__": "gt",
    "ge": "ge",
    "greater_equal": "ge",
    "__ge__": "ge",
    "eq": "eq",
    "__eq__": "eq",
    "ne": "ne",
    "not_equal": "ne",
    "__ne__": "ne",
    "bitwise_and": "and",
    "__and__": "and",
    "bitwise_or": "or",
    "__or__": "or",
    "bitwise_xor": "xor",
    "__xor__": "xor",
    "bitwise_left_shift": "lshift",
    "__lshift__": "lshift",
    "bitwise_right_shift": "rshift",
    "__rshift__": "rshift",
    "logical_and": "logical_and",
    "logical_or": "logical_or",
    "logical_xor": "logical_xor",
}
_HANDLERS = {
    **{name: functools.partial(_unary, op) for name, op in _UNARY.items()},
    **{name: functools.partial(_binary, op) for name, op in _BINARY.items()},
    **{name: functools.partial(lambda dt, x: _cast(x, dt), dt) for name, dt in _CASTS.items()},
    "__radd__": _swap("add"),
    "__rsub__": _swap("sub"),
    "rsub": _swap("sub"),
    "__rmul__": _swap("mul"),
    "__rtruediv__": _swap("truediv"),
    "__rdiv__": _swap("truediv"),
    "__rfloordiv__": _swap("floordiv"),
    "__rmod__": _swap("mod"),
    "__rpow__": _swap("pow"),
    "__rand__": _swap("and"),
    "__ror__": _swap("or"),
    "__rxor__": _swap("xor"),
    "add": _add,
    "sub": _sub,
    "subtract": _sub,
    "div": _div,
    "divide": _div,
    "__div__": _div,
    "max": _binary_max("maximum"),
    "min": _binary_max("minimum"),
    "where": _where,
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": lambda x, lo: _clamp(x, lo, None),
    "clamp_max": lambda x, hi: _clamp(x, None, hi),
    "relu": lambda x, *a, **k: _clamp(x, 0, None),
    "masked_fill": lambda x, mask, value: _where(mask, value, x),
    "square": lambda x: _binary("mul", x, x),
    "reciprocal": lambda x: _binary("truediv", 1.0, x),
    "log10": lambda x: _binary("mul", _unary("log", x), 1 / 2.302585092994046),
    "round": _round,
    "isnan": _isnan,
    "isinf": _isinf,
    "isfinite": _isfinite,
    "to": _method_to,
    "type": _method_to,
    "type_as": lambda x, other: _cast(x, other.dtype),
    "zeros_like": lambda x, **kw: _constant_like(x, 0, **kw),
    "ones_like": lambda x, **kw: _constant_like(x, 1, **kw),
    "full_like": lambda x, value, **kw: _constant_like(x, value, **kw),
    "new_tensor": lambda x, data, **kw: _factory_constant(data, **{"dtype": x.dtype, **kw}),
    "new_zeros": lambda x, size, **kw: _new_constant(x, size, 0, **kw),
    "new_ones": lambda x, size, **kw: _new_constant(x, size, 1, **kw),
    "new_full": lambda x, size, value, **kw: _new_constant(x, size, value, **kw),
    "clone": _identity,
    "detach": lambda x: _unary("detach", x),
    "contiguous": _identity,
    "squeeze": _identity,
    "__getitem__": lambda x, index: _getitem(x, index),
}
_DATA_DEPENDENT = frozenset(
    {"nonzero", "masked_select", "unique", "argwhere", "repeat_interleave", "unique_consecutive", "bincount"}
)
_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor", "full", "zeros", "ones"})


def _getitem(x, index):
    if isinstance(x, Traced):
        return x[index]
    if isinstance(x, PartialIndex):
        return x[index]
    return _gather(x, (), index)


def _func_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


_PUBLIC_MODULES = {
    "torch._C._nn": "torch.nn.functional",
    "torch._C._special": "torch.special",
    "torch._C._linalg": "torch.linalg",
}


def _qualname(func) -> str:
    """The name a user knows a torch function by (torch.exp, torch.Tensor.add_, torch.nn.functional.gelu)."""
    module = getattr(func, "__module__", None) or "torch"
    qualname = getattr(func, "__qualname__", _func_name(func))
    owner, _, name = qualname.rpartition(".")
    if owner in ("TensorBase", "Tensor", "_TensorBase"):
        return f"torch.Tensor.{name}"
    if owner == "_VariableFunctionsClass" or module.startswith("torch._C._VariableFunctions"):
        return f"torch.{name}"
    return f"{_PUBLIC_MODULES.get(module, module)}.{qualname}"


def _call(func, args, kwargs):
    """Apply a torch function or Tensor method to proxies (and real tensors / numbers)."""
    name = _func_name(func)
    if "out" in kwargs:
        raise _in_place(f"{name}(..., out=...)")
    if name in _DATA_DEPENDENT or (name == "where" and len(args) + len(kwargs) == 1):
        raise refuse(f"{_qualname(func)} has a data-dependent output shape", "use torch.where(cond, a, b)")
    if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "copy_"):
        raise _in_place(name)
    if name.startswith("__i") and name[3:-2] in _IN_PLACE_DUNDERS:
        raise _in_place(name)
    handler = _HANDLERS.get(name)
    if handler is None:
        raise refuse(
            f"unsupported function {_qualname(func)}",
            "mods support elementwise torch ops (see flexattn.compiler's docs); build it from those",
        )
    try:
        return handler(*args, **kwargs)
    except TypeError as e:
        raise refuse(f"unsupported call {_qualname(func)}: {e}", "check the arguments") from None


_IN_PLACE_DUNDERS = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "div"}
)


def _method(name, self, *args, **kwargs):
    """``proxy.name(*args)``: Tensor methods on proxies."""
    return _call(_MethodName(name), (self, *args), kwargs)


class _MethodName:
    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.__qualname__ = f"Tensor.{name}"
        self.__module__ = "torch"


def _has_proxy(values) -> bool:
    for v in values:
        if isinstance(v, Traced | PartialIndex):
            return True
        if isinstance(v, tuple | list) and _has_proxy(v):
            return True
    return False


class _TraceMode(TorchFunctionMode):
    """Routes torch calls on proxies to the tracer; turns scalar factories into constants."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _has_proxy(args) or _has_proxy(kwargs.values()):
            return _call(func, args, kwargs)
        name = _func_name(func)
        if name in _FACTORIES and args:
            data = args[0] if name in ("tensor", "as_tensor", "scalar_tensor") else args[-1]
            shape_ok = name in ("tensor", "as_tensor", "scalar_tensor") or tuple(args[0]) == ()
            if shape_ok and _as_number(data) is not None and len(args) <= 2:
                if name in ("zeros", "ones"):
                    data = 0 if name == "zeros" else 1
                    kwargs.setdefault("dtype", torch.get_default_dtype())
                return _factory_constant(data, dtype=kwargs.get("dtype"))
        return func(*args, **kwargs)


# --- entry point ---------------------------------------------------------------------------------


def _mod_name(mod) -> str:
    return getattr(mod, "__name__", None) or type(mod).__name__


def trace(mod, kind: str) -> Program:
    """Trace a score mod (``kind="score"``) or mask mod (``kind="mask"``) into a pruned graph."""
    graph = Graph()
    inputs = [Traced(graph, i) for i in range(len(INPUTS))]
    previous = (getattr(_STATE, "graph", None), getattr(_STATE, "mod_name", None))
    _STATE.graph, _STATE.mod_name = graph, _mod_name(mod)
    try:
        with _TraceMode():
            result = mod(*inputs) if kind == "score" else mod(*inputs[1:])
            if not isinstance(result, Traced | torch.Tensor | PartialIndex) and _as_number(result) is None:
                raise ModCompileError(
                    f"{_STATE.mod_name}: a {kind} mod must return a tensor or a number, "
                    f"got {type(result).__name__}\n  hint: return one value per (b, h, q_idx, kv_idx)"
                )
            out = _operand(result)
            out = _cast(out, torch.float32 if kind == "score" else torch.bool)
    finally:
        _STATE.graph, _STATE.mod_name = previous
    pruned, (output,) = graph.pruned([out.node])
    return Program(pruned, output, kind, _mod_name(mod))
