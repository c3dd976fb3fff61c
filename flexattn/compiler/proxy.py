"""Proxies for a mod's per-element values, and the typed op builders behind them.

A ``Traced`` stands for a 0-dim tensor (what a mod sees under ``torch.func.vmap``); operators on it
append typed nodes to the graph being traced. Result dtypes follow PyTorch exactly: every op first
runs on dummy 0-dim tensors of the operands' dtypes (Python numbers stay Python numbers), so type
promotion and errors such as "not implemented for 'Float'" are PyTorch's own. Indexing a captured
tensor with fewer indices than it has dimensions gives a ``PartialIndex`` that accumulates further
indices (``iv = intervals[img[kv_idx]]; iv[0]``), as vmap would.
"""

from __future__ import annotations

import functools
from numbers import Number

import torch
from torch.overrides import handle_torch_function

from flexattn.compiler.errors import (
    ModCompileError,
    current_graph,
    in_place,
    note_row_gather,
    note_tensor_read,
    out_of_range,
    refuse,
    trace_device,
    trace_sizes,
)
from flexattn.compiler.index_ranges import attained_range
from flexattn.compiler.ir import COMPARISONS, LOGICAL, LOW_PRECISION, OP_TORCH, Node


class Traced:
    """A per-element value inside a traced mod (behaves like a 0-dim tensor).

    Torch functions on it go to the trace's ``TorchFunctionMode`` (flexattn.compiler.trace), which
    sees them first; Tensor methods are routed there too.
    """

    __slots__ = ("graph", "node")
    shape = torch.Size([])
    ndim = 0
    is_cuda = False
    requires_grad = False

    def __init__(self, graph, node: int) -> None:
        self.graph = graph
        self.node = node

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise ModCompileError("a traced value was used outside its mod's trace")

    @property
    def dtype(self) -> torch.dtype:
        return self.graph.nodes[self.node].dtype

    @property
    def device(self) -> torch.device:
        """The device the kernels run on (so ``torch.zeros(n, device=q_idx.device)`` lands there)."""
        return trace_device()

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
        return f"Traced(%{self.node} {self.graph.nodes[self.node].op}, dtype={self.dtype})"

    __hash__ = object.__hash__

    def __pos__(self):
        return self

    def __neg__(self):
        return unary("neg", self)

    def __abs__(self):
        return unary("abs", self)

    def __invert__(self):
        return unary("invert", self)

    def __round__(self, ndigits=None):
        if ndigits:
            raise refuse("round(x, ndigits)", "only round(x) is supported")
        return unary("round", self)

    def __getattr__(self, name):
        """Tensor methods (``score.exp()``, ``q_idx.float()``) go through the trace's torch mode."""
        method = getattr(torch.Tensor, name, None) if not name.startswith("_") else None
        if method is None:
            raise AttributeError(f"a traced value has no attribute {name!r}")
        if not callable(method):
            raise refuse(f"attribute {name!r} of a per-element value", "use torch functions and operators")
        return lambda *args, **kwargs: handle_torch_function(method, (self,), self, *args, **kwargs)

    # What a per-element value cannot do at trace time
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
        raise in_place("item assignment")

    def _in_place_operator(self, *_):
        raise in_place("an augmented assignment (`+=`, `*=`, ...)")


# Binary operators, both ways round (a + 1 and 1 + a), plus comparisons; augmented assignments
# (+= ...) would mutate the caller's tensor in eager PyTorch and are refused.
_OPERATORS = (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "and",
    "or",
    "xor",
    "lshift",
    "rshift",
)
for _op in _OPERATORS:
    setattr(Traced, f"__{_op}__", lambda self, other, _op=_op: binary(_op, self, other))
    setattr(Traced, f"__r{_op}__", lambda self, other, _op=_op: binary(_op, other, self))
    setattr(Traced, f"__i{_op}__", Traced._in_place_operator)
for _op in COMPARISONS:
    setattr(Traced, f"__{_op}__", lambda self, other, _op=_op: binary(_op, self, other))


class PartialIndex:
    """A captured tensor indexed by fewer indices than it has dimensions (a row of a table)."""

    def __init__(self, tensor: torch.Tensor, indices: tuple[int, ...]) -> None:
        self.tensor = tensor
        self.indices = indices

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise ModCompileError("a traced value was used outside its mod's trace")

    def __getitem__(self, index):
        note_row_gather()
        return gather(self.tensor, self.indices, index)

    def __len__(self) -> int:
        return self.tensor.shape[len(self.indices)]

    def __iter__(self):  # ``start, end = spans[image[kv_idx]]``: the row's elements, as eager unpacks them
        return (self[i] for i in range(len(self)))

    def refuse_as_value(self, *_, **__):
        got, ndim = len(self.indices), self.tensor.ndim
        raise refuse(
            f"a captured tensor of shape {tuple(self.tensor.shape)} indexed with {got} of its {ndim} indices "
            "was used as a value (per element it would be a whole row, not a number)",
            "index every dimension, e.g. table[i][0] or table[i, 0]",
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = refuse_as_value
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __and__ = __or__ = __bool__ = refuse_as_value
    __hash__ = object.__hash__


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
        return unary("fast_tanh", x)
    return torch.tanh(x)


# --- operands ------------------------------------------------------------------------------------


def untraced(fn):
    """Run a builder with torch functions undispatched (the trace mode stays out of its internals)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return wrapper


def as_number(x):
    """Python numbers (and numpy scalars) as plain bool/int/float, else None."""
    if isinstance(x, bool | int | float):
        return x
    if isinstance(x, Number) and hasattr(x, "item"):
        return x.item()
    return None


@untraced
def operand(x) -> Traced | bool | int | float:
    """A proxy or a Python number; captured 0-dim tensors become loads."""
    if isinstance(x, Traced):
        return x
    number = as_number(x)
    if number is not None:
        return number
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            graph = current_graph()
            return Traced(graph, graph.add(Node("load", (), x.dtype, graph.capture(x))))
        raise refuse(
            f"a tensor of shape {tuple(x.shape)} was used as a per-element value (a mod computes one "
            "0-dim value per (b, h, q_idx, kv_idx))",
            "index it with b, h, q_idx, kv_idx (e.g. bias[h, q_idx]) so each element reads one number",
        )
    if isinstance(x, PartialIndex):
        x.refuse_as_value()
    raise refuse(f"unsupported operand of type {type(x).__name__}", "use tensors, proxies or Python numbers")


def _dummy(x):
    return torch.ones((), dtype=x.dtype) if isinstance(x, Traced) else x


@functools.lru_cache(maxsize=4096)
def _result_dtype_cached(op: str, signature: tuple, default_dtype: torch.dtype) -> torch.dtype:
    """``default_dtype`` is only a key: torch's default decides the dtype of ``int * 0.5``."""
    dummies = [torch.ones((), dtype=s) if isinstance(s, torch.dtype) else s[1] for s in signature]
    return OP_TORCH[op](*dummies).dtype


def result_dtype(op: str, *xs) -> torch.dtype:
    """PyTorch's result dtype for ``op`` on these operands (proxies, dtypes or Python numbers)."""
    signature = tuple(
        x if isinstance(x, torch.dtype) else x.dtype if isinstance(x, Traced) else (type(x), x) for x in xs
    )
    try:
        return _result_dtype_cached(op, signature, torch.get_default_dtype())
    except Exception as e:  # PyTorch's own refusal, e.g. bitwise ops on floats
        raise refuse(f"torch rejects this operation: {e}", "check the operand dtypes") from None


def _node(x, dtype: torch.dtype, opmath: bool = False) -> int:
    """The node for operand ``x`` converted to ``dtype`` (numbers become constants; a number in a
    float16/bfloat16 op stays float32, as in PyTorch's opmath)."""
    graph = current_graph()
    if isinstance(x, Traced):
        return graph.cast(x.node, dtype)
    if opmath and dtype in LOW_PRECISION:
        return graph.const(x, torch.float32)
    return graph.const(x, dtype)


def _new(op: str, args: tuple[int, ...], dtype: torch.dtype) -> Traced:
    graph = current_graph()
    return Traced(graph, graph.add(Node(op, args, dtype)))


def _to_proxy(x) -> Traced:
    return x if isinstance(x, Traced) else Traced(current_graph(), _node(x, torch.tensor(x).dtype))


# --- typed builders (PyTorch semantics) ----------------------------------------------------------


@untraced
def binary(op: str, a, b) -> Traced:
    a, b = operand(a), operand(b)
    dtype = result_dtype(op, a, b)
    if op in COMPARISONS:
        compute = torch.result_type(_dummy(a), _dummy(b))
        return _new(op, (_node(a, compute), _node(b, compute)), torch.bool)
    if op in LOGICAL:
        return _new(op, (_node(a, torch.bool), _node(b, torch.bool)), torch.bool)
    return _new(op, (_node(a, dtype, True), _node(b, dtype, True)), dtype)


@untraced
def unary(op: str, x) -> Traced:
    x = _to_proxy(operand(x))
    dtype = result_dtype(op, x)
    if op in ("floor", "ceil", "round", "trunc") and not dtype.is_floating_point:
        return x
    if op in LOGICAL:
        return _new(op, (_node(x, torch.bool),), torch.bool)
    if op == "signbit":  # a bool from the operand's own bits
        return _new(op, (x.node,), torch.bool) if x.dtype.is_floating_point else binary("lt", x, 0)
    if op == "invert" and dtype == torch.bool:
        return _new("logical_not", (x.node,), torch.bool)
    return _new(op, (_node(x, dtype),), dtype)


@untraced
def where(cond, a, b) -> Traced:
    cond, a, b = operand(cond), operand(a), operand(b)
    if isinstance(cond, Traced) and cond.dtype != torch.bool:
        raise refuse(f"torch.where condition of dtype {cond.dtype}", "compare to get a bool, e.g. x != 0")
    dtype = result_dtype("where", torch.bool, a, b)
    return _new("where", (_node(cond, torch.bool), _node(a, dtype), _node(b, dtype)), dtype)


@untraced
def cast(x, dtype: torch.dtype) -> Traced:
    x = _to_proxy(operand(x))
    if dtype == torch.bool and x.dtype != torch.bool:
        return binary("ne", x, 0)
    return Traced(x.graph, x.graph.cast(x.node, dtype))


@untraced
def clamp(x, min=None, max=None) -> Traced:  # noqa: A002 (torch's keyword names)
    lo, hi = min, max
    if lo is None and hi is None:
        raise refuse("clamp() without bounds", "pass min= and/or max=")
    operands = [operand(v) for v in (x, lo, hi) if v is not None]
    dtype = torch.result_type(*[_dummy(o) for o in operands[:2]])
    if len(operands) == 3:
        dtype = torch.promote_types(dtype, torch.result_type(_dummy(operands[0]), _dummy(operands[2])))
    out = Traced(current_graph(), _node(operands[0], dtype))
    if lo is not None:
        out = _new("clamp_min", (out.node, _node(operand(lo), dtype, True)), dtype)
    if hi is not None:
        out = _new("clamp_max", (out.node, _node(operand(hi), dtype, True)), dtype)
    return out


@untraced
def constant_like(x, value, dtype=None, **_) -> Traced:
    """``torch.full_like(x, value)`` for a per-element ``x``: a constant."""
    if isinstance(value, torch.Tensor):  # its value, now, becomes the constant
        note_tensor_read()
    dtype = dtype or _to_proxy(operand(x)).dtype
    return Traced(current_graph(), current_graph().const(value, dtype))


@untraced
def constant(data, dtype=None, **_) -> Traced:
    """``torch.tensor(number)``: a constant, typed like PyTorch would (int64, float32, bool)."""
    number = as_number(data)
    dtype = dtype or torch.tensor(number).dtype
    return Traced(current_graph(), current_graph().const(number, dtype))


@untraced
def gather(tensor: torch.Tensor, prefix: tuple[int, ...], index) -> Traced | PartialIndex:
    """``tensor[prefix..., index...]`` with per-element indices: a load, or a partial index."""
    graph = current_graph()
    nodes = list(prefix)
    for item in index if isinstance(index, tuple) else (index,):
        if item is None or item is Ellipsis or isinstance(item, slice | list):
            raise refuse(
                f"indexing a captured tensor with {item!r} (per element, that gives a vector, not a number)",
                "index with integers or int tensors computed from b, h, q_idx, kv_idx",
            )
        if isinstance(item, torch.Tensor) and item.ndim > 0:
            raise refuse(
                "indexing a captured tensor with a non-scalar tensor (data-dependent shape)",
                "index with b, h, q_idx, kv_idx or values computed from them",
            )
        nodes.append(_index_node(operand(item)))
    if len(nodes) > tensor.ndim:
        raise refuse(
            f"{len(nodes)} indices for a captured tensor of shape {tuple(tensor.shape)}", "check the indexing"
        )
    if len(nodes) < tensor.ndim:
        return PartialIndex(tensor, tuple(nodes))
    sizes = trace_sizes()
    if sizes is not None:
        for dim, node in enumerate(nodes):
            found = attained_range(graph, node, sizes)
            if found is not None and (found[0] < -tensor.shape[dim] or found[1] >= tensor.shape[dim]):
                raise out_of_range(dim, tuple(tensor.shape), *found)
    return Traced(graph, graph.add(Node("load", tuple(nodes), tensor.dtype, graph.capture(tensor))))


def _index_node(item) -> int:
    if isinstance(item, Traced):
        if item.dtype in (torch.bool, torch.uint8):
            raise refuse(
                "boolean-mask indexing of a captured tensor (data-dependent shape)",
                "use torch.where(cond, table[i], other) instead",
            )
        if item.dtype.is_floating_point:
            raise refuse(f"indexing with a {item.dtype} value", "convert the index with .long() or .int()")
        return item.node
    if isinstance(item, bool) or not isinstance(item, int):
        raise refuse(f"indexing a captured tensor with {item!r}", "use an integer index")
    return current_graph().const(item, torch.int64)


@untraced
def searchsorted(sorted_sequence, value, right: bool = False, out_int32: bool = False) -> Traced:
    """``torch.searchsorted(sorted_sequence, value, right=right)`` for a captured 1-D sequence."""
    if not isinstance(sorted_sequence, torch.Tensor) or sorted_sequence.ndim != 1:
        shape = tuple(getattr(sorted_sequence, "shape", ()))
        raise refuse(
            f"searchsorted/bucketize over {type(sorted_sequence).__name__} of shape {shape}",
            "search a captured 1-D sorted tensor (e.g. document offsets) for a per-element value",
        )
    v = _to_proxy(operand(value))
    compute = torch.promote_types(sorted_sequence.dtype, v.dtype)
    graph = current_graph()
    slot = graph.capture(sorted_sequence)
    dtype = torch.int32 if out_int32 else torch.int64
    return Traced(
        graph, graph.add(Node("search", (graph.cast(v.node, compute),), dtype, (slot, bool(right))))
    )
