"""Generated interval functions (``intervals.py``) by mask structure, generated once each.

Keyed like the element-wise mask functions (IR structure, capture dtypes/ranks, target), and also by
the element-wise function itself, so a repeat ``create_block_mask`` with a fingerprinted mod finds
its interval function without tracing again.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from flexattn.compiler import cache
from flexattn.compiler.codegen import MODULE_HEADER
from flexattn.compiler.intervals import IntervalPlan, interval_function
from flexattn.compiler.trace import Program

_LOCK = threading.Lock()
_BY_MASK_FN: dict[Any, IntervalEntry] = {}


@dataclass(frozen=True)
class IntervalEntry:
    """One generated interval function, its run-time plan, and its source (for ``explain``)."""

    fn: Any
    plan: IntervalPlan
    source: str
    path: str


def for_mask_fn(mask_fn) -> IntervalEntry | None:
    """The entry recorded for an element-wise mask function (see ``remember``), if any."""
    return _BY_MASK_FN.get(mask_fn)


def remember(mask_fn, entry: IntervalEntry) -> None:
    with _LOCK:
        _BY_MASK_FN[mask_fn] = entry


def clear() -> None:
    with _LOCK:
        _BY_MASK_FN.clear()


def interval_entry(program: Program, target: str) -> IntervalEntry:
    """The interval function of a traced mask mod for ``target`` (generated on the first call)."""
    graph, output = program.graph, program.output
    key = ("interval", target, graph.structure_key([output], False))
    found = cache.lookup(key)
    if found is None:
        found = cache.store(key, lambda: _generate(program, target))
    return found.fn


def _generate(program: Program, target: str) -> cache.CompiledMod:
    graph, output = program.graph, program.output
    suffix = hashlib.sha256(repr(graph.structure_key([output], False)).encode()).hexdigest()[:8]
    name = f"mask_intervals_{suffix}"
    body, plan = interval_function(graph, output, name)
    header = MODULE_HEADER.format(name=program.name, target=target)
    source = header + "from flexattn.compiler import interval_math as im  # noqa: F401\n\n\n" + body + "\n"
    module, path = cache.load_module(source)
    entry = IntervalEntry(getattr(module, name), plan, source, path)
    # cache.CompiledMod's fn slot holds the whole entry (the plan travels with the code)
    return cache.CompiledMod(entry, None, (), source, path)
