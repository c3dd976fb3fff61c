"""Trace-time errors that point at the user's source line, and the state of the trace in progress."""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import threading

import torch

from flexattn.compiler.ir import Graph

_COMPILER_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_STATE = threading.local()


class ModCompileError(Exception):
    """A mod uses something the compiler cannot turn into kernel code (message has line + hint)."""


class ModIndexError(IndexError):
    """A gather in a mod reads outside a captured tensor for some (b, h, q_idx, kv_idx) of the grid
    (message has the source line, the index range, the tensor's shape and a hint)."""


_KEYS = ("graph", "mod_name", "device", "read_tensor_values", "sizes", "row_gathers")


@contextlib.contextmanager
def tracing(graph: Graph, mod_name: str, device: torch.device | None = None, sizes: dict | None = None):
    """Make ``graph`` the target of proxy operations (``mod_name`` names it in errors; ``device`` is
    what the mod's values report as their device; ``sizes``, if given, is the grid the mod will be
    evaluated on, ``{"b": B, "h": H, "q_idx": Q_LEN, "kv_idx": KV_LEN}``, against which gathers are
    checked as they are traced)."""
    previous = tuple(getattr(_STATE, k, None) for k in _KEYS)
    for key, value in zip(_KEYS, (graph, mod_name, device, False, sizes, False)):
        setattr(_STATE, key, value)
    try:
        yield
    finally:
        for key, value in zip(_KEYS, previous):
            setattr(_STATE, key, value)


def trace_sizes() -> dict | None:
    """The grid of the trace in progress (see ``tracing``), or None when it is not checked."""
    return getattr(_STATE, "sizes", None)


def current_graph() -> Graph:
    graph = getattr(_STATE, "graph", None)
    if graph is None:
        raise ModCompileError("a traced value was used after its mod finished tracing")
    return graph


def trace_device() -> torch.device:
    return getattr(_STATE, "device", None) or torch.device("cpu")


def note_tensor_read() -> None:
    """Record that the trace in progress read a tensor's values (``float(t)``, ``t.exp()``): its
    result holds them, and a write through ``.data`` changes them without a version bump."""
    _STATE.read_tensor_values = True


def tensor_values_read() -> bool:
    return bool(getattr(_STATE, "read_tensor_values", False))


def note_row_gather() -> None:
    """Record that the trace in progress indexed a gathered row of a captured tensor again."""
    _STATE.row_gathers = True


def row_gathers_noted() -> bool:
    return bool(getattr(_STATE, "row_gathers", False))


def mod_name() -> str:
    return getattr(_STATE, "mod_name", None) or "mod"


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
    """The error for an unsupported construct at the user's current source line."""
    return ModCompileError(f"{mod_name()}: {what}\n  at {_user_location()}\n  hint: {hint}")


def in_place(what: str) -> ModCompileError:
    return refuse(f"in-place operation ({what})", "write it out of place, e.g. `score = score + bias`")


def out_of_range(dim: int, shape: tuple, lo: int, hi: int) -> ModIndexError:
    """The error for a gather whose index leaves ``[-n, n)`` for some element of the grid."""
    sizes = trace_sizes()
    n = shape[dim]
    names = {"b": "B", "h": "H", "q_idx": "Q_LEN", "kv_idx": "KV_LEN"}
    grid = ", ".join(f"{name}={sizes[key]}" for key, name in names.items())
    return ModIndexError(
        f"{mod_name()}: the index into dimension {dim} of a captured tensor of shape {shape} takes values "
        f"in [{lo}, {hi}] on the grid ({grid}), but must lie in [{-n}, {n})\n  at {_user_location()}\n"
        f"  hint: mods are evaluated at every (b, h, q_idx, kv_idx), masked pairs included: clamp the "
        f"index (e.g. idx.clamp({-n if lo < 0 else 0}, {n - 1})) or size the tensor for the whole grid"
    )
