"""What of a mod ``torch.compile`` must see: paths from the mod to every value its trace can read.

A graph compiled by torch.compile is reused for any later call that passes its guards, and Dynamo
guards a function passed in by its code object alone: a new closure over new tensors or numbers
(``padding_mask(keep)`` per batch, one wrapper over a causal and a sliding-window mod) passes. So
flexattn's compiled path (``custom_ops.py``) makes Dynamo read, in traced code, everything the mod
compiler could have read when it traced the mod, along the paths recorded here:

- captured tensors become graph inputs of the custom ops (their values, shapes and in-place
  updates reach the kernels on every call);
- Python numbers, strings, bools and None are compared with their value at trace time, so Dynamo
  guards on them (a new value recompiles; without this an int that changed would become a
  symbolic input and the compiled code would keep the old constant);
- functions on the way (mods calling mods, ``and_masks``' tuple of mods) are realized, so Dynamo
  guards on their code.

The walk covers what ``fingerprint.py`` keys on (closure cells, defaults, the globals a user
function's code names, attributes set on functions) and more (attributes of user objects and
nn.Modules, bound methods, ``functools.partial``), since under torch.compile no fallback re-traces
the mod on every call.

A path is a tuple of steps ``(kind, key)``: ``("cell", i)`` closure cell, ``("default", i)``,
``("kwdefault", name)``, ``("global", (module, name))`` a module-level name of a function's module, ``("attr",
name)``, ``("item", key)`` of a list, tuple or dict.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

import torch

from flexattn.compiler.fingerprint import global_names

Path = tuple[tuple[str, object], ...]

MAX_DEPTH = 16
_SCALARS = (bool, int, float, str, type(None))
_LIBRARIES = ("flexattn", "torch")  # functions whose module-level names users do not rebind
_OPAQUE = (types.ModuleType, type, types.BuiltinFunctionType, types.CodeType, torch.dtype, torch.device)


@dataclass(frozen=True)
class Reach:
    """Paths from one mod to what torch.compile must see of it (all Dynamo-readable constants).

    Attributes:
        tensors: one path per captured tensor of the compiled mod, in ``KernelMod.captures`` order.
        scalars: ``(path, value)`` for every Python scalar the walk met, with its value at trace time.
        functions: paths to the functions the walk went through (the root is the empty path).
    """

    tensors: tuple[Path, ...]
    scalars: tuple[tuple[Path, object], ...]
    functions: tuple[Path, ...]


def reach(root, captures: tuple[torch.Tensor, ...], name: str) -> Reach:
    """The Reach of ``root`` whose tensor paths lead to ``captures`` (by identity).

    Raises ValueError naming the mod when a captured tensor cannot be reached: a tensor computed
    while the mod was traced (``w * 2``, ``torch.arange(...)`` inside the mod) would be frozen into
    the compiled graph with its first value.
    """
    tensor_paths: dict[int, Path] = {}
    scalars: list[tuple[Path, object]] = []
    functions: list[Path] = []
    for path, value in _walk(root):
        if isinstance(value, torch.Tensor):
            tensor_paths.setdefault(id(value), path)
        elif isinstance(value, _SCALARS):
            scalars.append((path, value))
        elif callable(value) and not isinstance(value, torch.nn.Module):
            functions.append(path)
    missing = [t for t in captures if id(t) not in tensor_paths]
    if missing:
        shape = tuple(missing[0].shape)
        raise ValueError(
            f"flexattn under torch.compile: {name} uses a tensor of shape {shape} that it computes while "
            "it runs (or that cannot be reached through its closure, defaults, globals or attributes). "
            "Compute the tensor outside the mod and capture the result, e.g. "
            "`offsets = lengths.cumsum(0)` before `def mask_mod(...)`."
        )
    return Reach(tuple(tensor_paths[id(t)] for t in captures), tuple(scalars), tuple(functions))


def follow(root, path: Path):
    """The value at ``path`` from ``root``. Runs inside Dynamo's trace: plain attribute/item reads."""
    obj = root
    for kind, key in path:
        if kind == "cell":
            obj = obj.__closure__[key].cell_contents
        elif kind == "default":
            obj = obj.__defaults__[key]
        elif kind == "kwdefault":
            obj = obj.__kwdefaults__[key]
        elif kind == "global":  # through sys.modules: Dynamo cannot read __globals__ of inner functions
            module, name = key  # the module named in the path: a function made in traced code has no source
            obj = getattr(sys.modules[module], name)
        elif kind == "attr":
            obj = getattr(obj, key)
        else:
            obj = obj[key]
    return obj


def _walk(root):
    """``(path, value)`` for every value reachable from ``root``, each object once (breadth first)."""
    frontier, seen = [((), root)], set()
    for _ in range(MAX_DEPTH + 1):
        next_frontier = []
        for path, obj in frontier:
            if id(obj) in seen and not isinstance(obj, _SCALARS):
                continue
            seen.add(id(obj))
            yield path, obj
            next_frontier.extend(((*path, step), child) for step, child in _children(obj))
        frontier = next_frontier
        if not frontier:
            return


def _children(obj):
    if isinstance(obj, (torch.Tensor, *_SCALARS, *_OPAQUE)):
        return
    if isinstance(obj, types.FunctionType):
        yield from _function_children(obj)
    elif isinstance(obj, types.MethodType):
        yield ("attr", "__func__"), obj.__func__
        yield ("attr", "__self__"), obj.__self__
    elif isinstance(obj, functools.partial):
        yield ("attr", "func"), obj.func
        yield ("attr", "args"), obj.args
        yield ("attr", "keywords"), obj.keywords
    elif isinstance(obj, torch.nn.Module):
        for name, child in (*obj._parameters.items(), *obj._buffers.items(), *obj._modules.items()):
            yield ("attr", name), child
        yield from ((("attr", k), v) for k, v in vars(obj).items() if not k.startswith("_") and _plain(v))
    elif isinstance(obj, (list, tuple)):
        yield from ((("item", i), child) for i, child in enumerate(obj))
    elif isinstance(obj, dict):
        yield from ((("item", k), v) for k, v in obj.items() if isinstance(k, (str, int)))
    elif hasattr(obj, "__dict__"):
        yield from ((("attr", k), v) for k, v in vars(obj).items() if not k.startswith("__"))


def _function_children(fn: types.FunctionType):
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            yield ("cell", i), cell.cell_contents
        except ValueError:  # an empty cell (a name assigned after the function was defined)
            continue
    for i, default in enumerate(fn.__defaults__ or ()):
        yield ("default", i), default
    for name, default in (fn.__kwdefaults__ or {}).items():
        yield ("kwdefault", name), default
    if (fn.__module__ or "").split(".")[0] in _LIBRARIES:
        return
    module = sys.modules.get(fn.__module__)
    if module is not None and getattr(module, "__dict__", None) is fn.__globals__:
        for name in global_names(fn.__code__):
            if name in fn.__globals__ and not isinstance(fn.__globals__[name], types.ModuleType):
                yield ("global", (fn.__module__, name)), fn.__globals__[name]
    for name, value in vars(fn).items():  # attributes set on the function (``mask.window = 4``)
        yield ("attr", name), value


def _plain(value) -> bool:
    """Attributes of an nn.Module worth walking: data and functions, not hooks or the module's machinery."""
    return isinstance(value, (torch.Tensor, *_SCALARS, list, tuple, types.FunctionType, types.MethodType))
