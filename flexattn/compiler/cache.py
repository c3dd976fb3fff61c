"""The compile cache: structure key -> generated device functions (and their source).

Code is generated once per key (IR structure + capture dtypes/ranks + target); new captured
values, new sequence lengths or a fresh but identical closure hit the cache. Generated modules are
written to files (``$FLEXATTN_CACHE_DIR``, default ``<tmp>/flexattn-<user>/mods``) because Triton
reads a JIT function's source with ``inspect``; the path also helps debugging.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.util
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

_LOCK = threading.Lock()
_ENTRIES: dict[tuple, CompiledMod] = {}
_STATS = {"codegen": 0}


@dataclass(frozen=True)
class CompiledMod:
    """Generated functions for one key. ``grad_slots``: capture slots that receive gradients."""

    fn: Any
    grad_fn: Any
    grad_slots: tuple[int, ...]
    source: str
    path: str
    bias_fn: Any = None  # additive score mods: the base-2 bias (compiler/additive.py)
    tile_grad_fn: Any = None  # score mods with diagonal gathers: the gradient taking the tile origin


def codegen_count() -> int:
    """How many times code has been generated in this process (the tests' compile counter)."""
    return _STATS["codegen"]


def clear() -> None:
    """Forget every cached mod (the next compile of each generates code again)."""
    with _LOCK:
        _ENTRIES.clear()


def lookup(key: tuple) -> CompiledMod | None:
    return _ENTRIES.get(key)


def store(key: tuple, build) -> CompiledMod:
    """Return the entry for ``key``, calling ``build()`` (which generates code) on a miss."""
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is None:
            entry = build()
            _STATS["codegen"] += 1
            _ENTRIES[key] = entry
        return entry


def cache_dir() -> str:
    default = os.path.join(tempfile.gettempdir(), f"flexattn-{getpass.getuser()}", "mods")
    return os.environ.get("FLEXATTN_CACHE_DIR", default)


def load_module(source: str):
    """Write ``source`` to a file named by its hash and import it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"mod_{digest}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".py.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"flexattn_generated_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path
