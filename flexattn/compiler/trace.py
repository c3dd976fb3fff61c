"""Tracing: run a mod once on proxies and record what it computes as a typed IR graph.

Each input of the mod becomes a ``Traced`` proxy (flexattn.compiler.proxy). Python operators act on
the proxies directly; torch functions and Tensor methods reach a ``TorchFunctionMode`` active for
the duration of the trace, which maps the supported surface onto the proxy builders (this file's
tables), turns constant factories (``torch.tensor(2.0)``) into IR constants, and refuses the rest
with the user's source line and a hint.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from flexattn.compiler.composites import HANDLERS as COMPOSITES
from flexattn.compiler.composites import REFUSED
from flexattn.compiler.errors import (
    ModCompileError,
    in_place,
    mod_name,
    note_tensor_read,
    refuse,
    row_gathers_noted,
    tensor_values_read,
    tracing,
)
from flexattn.compiler.ir import INPUTS, Graph
from flexattn.compiler.proxy import (
    PartialIndex,
    Traced,
    as_number,
    binary,
    cast,
    clamp,
    constant,
    constant_like,
    gather,
    operand,
    result_dtype,
    searchsorted,
    unary,
    where,
)


@dataclass
class Program:
    """A traced mod: the pruned graph, its single output and the mod's kind ("score"/"mask").

    ``read_tensor_values``: the mod ran torch on a real tensor while tracing (``float(t)``, ``if t:``,
    ``t.exp()``, ``t[0]``), so the graph holds what that read or made at that moment.
    """

    graph: Graph
    output: int
    kind: str
    name: str
    read_tensor_values: bool
    needs_vmap: bool = False  # evaluated on broadcast index grids it would differ (mod_eval.vmap_mod)


# --- the supported torch surface: names -> builders ------------------------------------------------


def _swap(op):
    return lambda a, b, *rest, **kw: binary(op, b, a)


def _add(a, b, *, alpha=1):
    return binary("add", a, b if alpha == 1 else binary("mul", b, alpha))


def _sub(a, b, *, alpha=1):
    return binary("sub", a, b if alpha == 1 else binary("mul", b, alpha))


def _div(a, b, *, rounding_mode=None):
    if rounding_mode is None:
        return binary("truediv", a, b)
    if rounding_mode == "floor":
        return binary("floordiv", a, b)
    quotient = binary("truediv", a, b)
    return cast(unary("trunc", quotient), result_dtype("floordiv", operand(a), operand(b)))


def _method_to(x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, Traced | torch.Tensor):
            dtype = a.dtype
    return x if dtype is None else cast(x, dtype)


def _searchsorted(sorted_sequence, value, *, out_int32=False, right=False, side=None, sorter=None):
    if sorter is not None:
        raise refuse("searchsorted(..., sorter=...)", "sort the captured sequence once outside the mod")
    return searchsorted(sorted_sequence, value, right or side == "right", out_int32)


def _bucketize(value, boundaries, *, out_int32=False, right=False):
    return searchsorted(boundaries, value, right, out_int32)


def _new_constant(x, size, value, dtype=None, **_):
    if tuple(size) != ():
        raise refuse(
            f"a new tensor of shape {tuple(size)} inside a mod", "mods compute one 0-dim value per element"
        )
    return constant_like(x, value, dtype=dtype)


def _isnan(x):
    return binary("ne", x, x)


def _isinf(x):
    if not operand(x).dtype.is_floating_point:
        return constant(False)
    return binary("eq", unary("abs", x), float("inf"))


def _isfinite(x):
    if not operand(x).dtype.is_floating_point:
        return constant(True)
    return binary("lt", unary("abs", x), float("inf"))


def _binary_max(op):
    def handler(a, b=None, *rest, **kwargs):
        if b is None or rest or kwargs:
            raise refuse(f"torch.{op[:3]} as a reduction", f"use torch.{op}(a, b) for two values")
        return binary(op, a, b)

    return handler


def _identity(x, *args, **kwargs):
    return operand(x)


_CASTS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int": torch.int32,
    "long": torch.int64,
    "short": torch.int16,
    "char": torch.int8,
    "byte": torch.uint8,
    "bool": torch.bool,
}
# IR op: the torch names that mean it (functions, Tensor methods, operator dunders)
_UNARY_NAMES = {
    "neg": "neg negative __neg__",
    "abs": "abs absolute __abs__",
    "sign": "sign sgn",
    "exp": "exp",
    "exp2": "exp2 special_exp2",
    "log": "log",
    "log2": "log2",
    "log1p": "log1p special_log1p",
    "expm1": "expm1 special_expm1",
    "tanh": "tanh",
    "sigmoid": "sigmoid special_expit",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "floor": "floor",
    "ceil": "ceil",
    "trunc": "trunc fix",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "asin": "asin arcsin",
    "acos": "acos arccos",
    "atan": "atan arctan",
    "sinh": "sinh",
    "cosh": "cosh",
    "asinh": "asinh arcsinh",
    "acosh": "acosh arccosh",
    "atanh": "atanh arctanh",
    "erf": "erf special_erf",
    "erfc": "erfc special_erfc",
    "log10": "log10",
    "signbit": "signbit",
    "invert": "bitwise_not __invert__",
    "logical_not": "logical_not",
}
_BINARY_NAMES = {
    "add": "__add__",
    "sub": "__sub__",
    "mul": "mul multiply __mul__",
    "truediv": "true_divide __truediv__",
    "floordiv": "floor_divide __floordiv__",
    "mod": "remainder __mod__",
    "fmod": "fmod",
    "pow": "pow __pow__",
    "maximum": "maximum",
    "minimum": "minimum",
    "fmax": "fmax",
    "fmin": "fmin",
    "atan2": "atan2 arctan2",
    "hypot": "hypot",
    "copysign": "copysign",
    "lt": "lt less __lt__",
    "le": "le less_equal __le__",
    "gt": "gt greater __gt__",
    "ge": "ge greater_equal __ge__",
    "eq": "eq __eq__",
    "ne": "ne not_equal __ne__",
    "and": "bitwise_and __and__",
    "or": "bitwise_or __or__",
    "xor": "bitwise_xor __xor__",
    "lshift": "bitwise_left_shift __lshift__",
    "rshift": "bitwise_right_shift __rshift__",
    "logical_and": "logical_and",
    "logical_or": "logical_or",
    "logical_xor": "logical_xor",
}
_UNARY = {name: op for op, names in _UNARY_NAMES.items() for name in names.split()}
_BINARY = {name: op for op, names in _BINARY_NAMES.items() for name in names.split()}
_HANDLERS = {
    **{name: functools.partial(unary, op) for name, op in _UNARY.items()},
    **{name: functools.partial(binary, op) for name, op in _BINARY.items()},
    **{name: functools.partial(lambda dt, x: cast(x, dt), dt) for name, dt in _CASTS.items()},
    "rsub": _swap("sub"),
    "__rsub__": _swap("sub"),
    "add": _add,
    "sub": _sub,
    "subtract": _sub,
    "div": _div,
    "divide": _div,
    "__div__": _div,
    "max": _binary_max("maximum"),
    "min": _binary_max("minimum"),
    "where": where,
    "clamp": clamp,
    "clip": clamp,
    "clamp_min": lambda x, lo: clamp(x, lo, None),
    "clamp_max": lambda x, hi: clamp(x, None, hi),
    "masked_fill": lambda x, mask, value: where(mask, value, x),
    "square": lambda x: binary("pow", x, 2),
    "reciprocal": lambda x: binary("truediv", 1.0, x),
    "searchsorted": _searchsorted,
    "bucketize": _bucketize,
    "isnan": _isnan,
    "isinf": _isinf,
    "isfinite": _isfinite,
    "to": _method_to,
    "type": _method_to,
    "type_as": lambda x, other: cast(x, other.dtype),
    "zeros_like": lambda x, **kw: constant_like(x, 0, **kw),
    "ones_like": lambda x, **kw: constant_like(x, 1, **kw),
    "full_like": lambda x, value, **kw: constant_like(x, value, **kw),
    "new_tensor": lambda x, data, **kw: constant(data, **{"dtype": x.dtype, **kw}),
    "new_zeros": lambda x, size, **kw: _new_constant(x, size, 0, **kw),
    "new_ones": lambda x, size, **kw: _new_constant(x, size, 1, **kw),
    "new_full": lambda x, size, value, **kw: _new_constant(x, size, value, **kw),
    "clone": _identity,
    "detach": lambda x: unary("detach", x),
    "contiguous": _identity,
    "positive": _identity,
    "squeeze": _identity,
    "__getitem__": lambda x, index: _getitem(x, index),
    **COMPOSITES,
}
_DATA_DEPENDENT = frozenset(
    {"nonzero", "masked_select", "unique", "argwhere", "repeat_interleave", "unique_consecutive", "bincount"}
)
_FACTORIES = frozenset({"tensor", "as_tensor", "scalar_tensor", "full", "zeros", "ones"})
# what a mod may ask of a real tensor without reading its values
_METADATA = frozenset(
    {"shape", "dtype", "device", "ndim", "requires_grad", "size", "dim", "stride", "numel", "__len__"}
)


def _getitem(x, index):
    if isinstance(x, Traced):
        return x[index]
    if isinstance(x, PartialIndex):
        return x[index]
    return gather(x, (), index)


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
        raise in_place(f"{name}(..., out=...)")
    if name in _DATA_DEPENDENT or (name == "where" and len(args) + len(kwargs) == 1):
        raise refuse(f"{_qualname(func)} has a data-dependent output shape", "use torch.where(cond, a, b)")
    if (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "copy_"):
        raise in_place(name)
    if name.startswith("__i") and name[3:-2] in _IN_PLACE_DUNDERS:
        raise in_place(name)
    if kwargs.get("inplace") is True:
        raise in_place(f"{_qualname(func)}(..., inplace=True)")
    handler = _HANDLERS.get(name)
    if handler is None:
        reason, hint = REFUSED.get(
            name,
            (None, "mods support elementwise torch ops (see flexattn.compiler's docs); build it from those"),
        )
        raise refuse(f"unsupported function {_qualname(func)}" + (f": {reason}" if reason else ""), hint)
    try:
        return handler(*args, **kwargs)
    except TypeError as e:
        raise refuse(f"unsupported call {_qualname(func)}: {e}", "check the arguments") from None


_IN_PLACE_DUNDERS = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "div"}
)


def _factory_shape(name: str, args: tuple) -> tuple | None:
    """The shape a scalar factory call makes (``torch.ones(3)`` -> (3,)), None if not plain ints.

    Tensors of other shapes are made for real: a mod may build a small table and gather from it,
    but not use it as a per-element value (``operand`` says so)."""
    if name in ("tensor", "as_tensor", "scalar_tensor"):
        return ()
    dims = args[:-1] if name == "full" else args
    if len(dims) == 1 and isinstance(dims[0], tuple | list | torch.Size):
        dims = tuple(dims[0])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _has(values, kinds) -> bool:
    for v in values:
        if isinstance(v, kinds):
            return True
        if isinstance(v, tuple | list) and _has(v, kinds):
            return True
    return False


def _has_proxy(values) -> bool:
    return _has(values, Traced | PartialIndex)


class _TraceMode(TorchFunctionMode):
    """Routes torch calls on proxies to the tracer; turns scalar factories into constants."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _has_proxy(args) or _has_proxy(kwargs.values()):
            return _call(func, args, kwargs)
        name = _func_name(func)
        if name in _FACTORIES and args and _factory_shape(name, args) == ():
            data = {"zeros": 0, "ones": 1}.get(name, args[-1] if name == "full" else args[0])
            if as_number(data) is not None:
                if name in ("zeros", "ones", "full") and not isinstance(data, bool):
                    kwargs.setdefault("dtype", torch.get_default_dtype() if name != "full" else None)
                return constant(data, dtype=kwargs.get("dtype"))
        if name not in _METADATA and _has((*args, *kwargs.values()), torch.Tensor):
            note_tensor_read()
        return func(*args, **kwargs)


# --- entry point ---------------------------------------------------------------------------------


def _mod_name(mod) -> str:
    return getattr(mod, "__name__", None) or type(mod).__name__


def trace(mod, kind: str, device=None, sizes: dict | None = None) -> Program:
    """Trace a score mod (``kind="score"``) or mask mod (``kind="mask"``) into a pruned graph.

    ``device`` (optional) is what the mod's values report as ``.device``. ``sizes`` (optional,
    ``{"b": B, "h": H, "q_idx": Q_LEN, "kv_idx": KV_LEN}``) also checks every gather against the
    grid the mod will run on (``index_ranges.py``; raises ``ModIndexError``).
    """
    graph = Graph()
    inputs = [Traced(graph, i) for i in range(len(INPUTS))]
    device = torch.device(device) if device is not None else None
    with tracing(graph, _mod_name(mod), device, sizes), _TraceMode():
        result = mod(*inputs) if kind == "score" else mod(*inputs[1:])
        if not isinstance(result, Traced | torch.Tensor | PartialIndex) and as_number(result) is None:
            raise ModCompileError(
                f"{mod_name()}: a {kind} mod must return a tensor or a number, "
                f"got {type(result).__name__}\n  hint: return one value per (b, h, q_idx, kv_idx)"
            )
        out = cast(operand(result), torch.float32 if kind == "score" else torch.bool)
        read_tensor_values = tensor_values_read()
        needs_vmap = row_gathers_noted()
    pruned, (output,) = graph.pruned([out.node])
    return Program(pruned, output, kind, _mod_name(mod), read_tensor_values, needs_vmap)
