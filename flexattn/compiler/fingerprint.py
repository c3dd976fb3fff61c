"""A cheap key for everything a trace of a mod can read, so repeat calls skip the trace.

Tracing runs the mod on proxies (0.1–0.3 ms of Python per mod); ``flex_attention`` compiles its
score and mask mod on every call, so without this key the host time per call can exceed the
kernel time of a sparse attention (measured on the H100: a 0.8 ms sliding-window forward timed at
up to 1.7 ms). The key (``mod_key``) covers:

- the mod's code object, default arguments and closure cells, recursively (mods calling mods,
  the tuple of mods inside ``and_masks``);
- for functions defined outside flexattn and torch: every module-level name their code (and
  nested code) reads, so rebinding a global tensor or number changes the key, and the attributes
  set on the function (``fn.window = 4``);
- tensors by identity, version counter (in-place updates), shape, strides, dtype, device and
  requires_grad; Python numbers, strings and None by type and value; dtypes, devices and builtin
  functions by value or identity; modules and classes by identity only when they belong to a
  library whose attributes users do not rebind (torch, math, flexattn, ...);
- torch's default dtype (what ``torch.tensor(0.5)`` in a mod means).

Anything else (objects, dicts, user modules and classes and their instances, even of tuple or
int subclasses such as a NamedTuple: their attributes can change without changing their identity;
``nn.Module`` mods, ``functools.partial``, bound methods, nesting deeper than ``MAX_DEPTH``) makes
the mod uncacheable: it is traced on every call, as before. So is a mod whose trace reads a
tensor's values (``float(t)``, ``if t:``, ``t.exp()``; ``Program.read_tensor_values``): a write
through ``.data`` or a numpy view changes them without moving the version counter.
Identities are only meaningful while their objects live: ``keep`` collects those objects (tensors,
code objects, modules, ...) so that a cache can check, through weak references, that none of them
died (``kernel_mod_cache.py``).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_DEPTH = 16  # nesting of functions and containers (and_masks of and_masks is about 8)
_LIBRARIES = ("flexattn", "torch")  # functions whose module-level state users do not rebind per call
# modules and classes from these packages are keyed by identity (their attributes are stable)
_STABLE_PACKAGES = frozenset(
    ("flexattn", "torch", "triton", "math", "cmath", "operator", "functools", "builtins", "numpy", "typing")
)
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_BY_VALUE = (torch.dtype, torch.device)
_SCALAR_TYPES = frozenset((bool, int, float, complex, str, bytes, type(None)))  # exactly these types
_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


class _Uncacheable(Exception):
    pass


@dataclass(frozen=True)
class Fingerprint:
    """``mod_key`` of one mod, computed once per call and shared by the call's check and compile.

    ``key`` is None for a mod the key cannot describe; ``keep`` holds the objects whose identities
    are in the key. Consumers use it only for the very object it was made from (``mod``).
    """

    mod: Any
    key: tuple | None
    keep: tuple


@dataclass(frozen=True)
class CallFingerprints:
    """The fingerprints of one call's score_mod and mask_mod (None where not computed)."""

    score: Fingerprint | None = None
    mask: Fingerprint | None = None


def fingerprint(mod) -> Fingerprint:
    """The :class:`Fingerprint` of ``mod`` now.

    Example:
        >>> fingerprint(lambda b, h, q, kv: q >= kv).key is not None
        True
    """
    keep: list = []
    key = mod_key(mod, keep)
    return Fingerprint(mod, key, tuple(keep))


def guard(obj) -> Callable[[], Any]:
    """A weak reference to ``obj``, one of a key's ``keep`` objects: called, it returns the object, or
    None once the object died (its id may then name another). Objects that take no weak reference
    (small immutable ones: ints, tuples, builtins) are held."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def fingerprint_of(mod, given: Fingerprint | None) -> Fingerprint:
    """``given`` if it was made from ``mod``, else a fresh fingerprint."""
    return given if given is not None and given.mod is mod else fingerprint(mod)


def mod_key(mod, keep: list) -> tuple | None:
    """A hashable key for ``mod`` (a plain Python function), or None if it cannot be keyed.

    Objects whose identity is part of the key are appended to ``keep``.
    """
    try:
        return (torch.get_default_dtype(), _function(mod, keep, 0))
    except (_Uncacheable, RuntimeError, TypeError, ValueError):  # e.g. stride() of a sparse tensor
        return None


def _function(fn, keep: list, depth: int) -> tuple:
    if not isinstance(fn, types.FunctionType) or depth > MAX_DEPTH:
        raise _Uncacheable
    code = fn.__code__
    keep.append(code)  # the code's identity is in the key, not the function's (fresh closures hit)
    closure = fn.__closure__
    try:
        cells = tuple(cell.cell_contents for cell in closure) if closure else ()
    except ValueError:  # an empty cell (a name assigned after the function was defined)
        raise _Uncacheable from None
    kw, defaults = fn.__kwdefaults__, fn.__defaults__
    parts = [  # (empty ones skip _value: most mods have no defaults, many no closure)
        "function",
        id(code),
        _value(defaults, keep, depth) if defaults else (),
        _value(tuple(sorted(kw.items())), keep, depth) if kw else (),
        _value(cells, keep, depth) if cells else (),
    ]
    if not _in_library(fn.__module__):
        found = fn.__globals__
        parts.append(tuple([(n, _value(found[n], keep, depth)) for n in global_names(code) if n in found]))
        if fn.__dict__:  # attributes set on the function (``mask.window = 4``), which mods may read
            parts.append(_value(tuple(sorted(fn.__dict__.items())), keep, depth))
    return tuple(parts)


def _value(value, keep: list, depth: int):
    kind = type(value)  # the commonest kinds first, with the answers the general rules below give
    if kind in _SCALAR_TYPES:
        return (kind.__name__, value)
    if kind in _TENSOR_TYPES:
        keep.append(value)
        return ("tensor", id(value), value._version, tuple(value.shape), value.stride(), value.dtype,
                value.device, value.requires_grad)  # fmt: skip
    if (kind is tuple or kind is list) and depth < MAX_DEPTH:
        return (kind.__name__, tuple(_value(item, keep, depth + 1) for item in value))
    if _package(kind) not in _STABLE_PACKAGES:  # a NamedTuple, an IntEnum: user class attributes
        raise _Uncacheable
    if isinstance(value, _SCALARS):
        return (type(value).__name__, value)
    if isinstance(value, torch.Tensor):
        keep.append(value)
        return ("tensor", id(value), value._version, tuple(value.shape), value.stride(), value.dtype,
                value.device, value.requires_grad)  # fmt: skip
    if isinstance(value, _BY_VALUE):
        return ("value", value)
    if isinstance(value, types.BuiltinFunctionType) or (
        isinstance(value, types.ModuleType | type) and _package(value) in _STABLE_PACKAGES
    ):
        keep.append(value)
        return ("id", id(value))
    if depth >= MAX_DEPTH:
        raise _Uncacheable
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_value(item, keep, depth + 1) for item in value))
    if isinstance(value, types.FunctionType):
        return _function(value, keep, depth + 1)
    raise _Uncacheable


def global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the code nested in it: lambdas, comprehensions) may read as globals.

    Remembered by the code object's identity (the memo holds the code, so the id stays its own):
    hashing a code object costs more than the lookup."""
    found = _GLOBAL_NAMES.get(id(code))
    if found is not None and found[0] is code:
        return found[1]
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += global_names(const)
    names = tuple(dict.fromkeys(names))
    _GLOBAL_NAMES[id(code)] = (code, names)
    return names


_GLOBAL_NAMES: dict[int, tuple[types.CodeType, tuple[str, ...]]] = {}
_LIBRARY_MODULES: dict[str | None, bool] = {}


def _in_library(module: str | None) -> bool:
    """Whether a function's ``__module__`` belongs to ``_LIBRARIES`` (remembered per name)."""
    found = _LIBRARY_MODULES.get(module)
    if found is None:
        found = _LIBRARY_MODULES[module] = (module or "").split(".")[0] in _LIBRARIES
    return found


def _package(module_or_class) -> str:
    name = (
        module_or_class.__name__
        if isinstance(module_or_class, types.ModuleType)
        else module_or_class.__module__
    )
    return (name or "").split(".")[0]
