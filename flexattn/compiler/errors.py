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


@contextlib.contextmanager
def tracing(graph: Graph, mod_name: str, device: torch.device | None = None):
    """Make ``graph`` the target of proxy operations (``mod_name`` names it in errors; ``device`` is
    what the mod's values report as their device)."""
    keys = ("graph", "mod_name", "device", "read_tensor_values")
    previous = tuple(getattr(_STATE, k, None) for k in keys)
    _STATE.graph, _STATE.mod_name, _STATE.device, _STATE.read_tensor_values = graph, mod_name, device, False
    try:
        yield
    finally:
        _STATE.graph, _STATE.mod_name, _STATE.device, _STATE.read_tensor_values = previous


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
