"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``JITFunction.run`` binds every argument, derives the specialisation key (each argument's type, a
pointer's 16-byte alignment, an int's divisibility by 16 or being 1) and looks the compiled kernel
up: about 35 us of Python per forward call (``benchmarks/bench_host.py --simulate-launch``), more
than the whole kernel at decode sizes. A launcher knows which of its arguments can change between
calls, so it builds a key that holds a *superset* of what Triton specialises on (values where
Triton looks at a property of the value) and :class:`LaunchCache` calls the kernel Triton chose for
that key directly on a hit. Everything else goes through ``JITFunction.run`` (which also compiles)
and remembers the kernel it used: the first launch of a key, Triton's interpreter, launch hooks
(profilers), pre-run hooks, an asynchronously compiling kernel.

Relies on Triton 3.6's ``CompiledKernel.run`` calling convention (the same call ``JITFunction.run``
makes); ``tests/kernels/test_launch.py`` checks the direct launch passes the launcher exactly what
Triton's own path passes.

:func:`recording` collects the launches one thread makes and :class:`Relaunch` makes one again with
new arguments of the same kind, straight to the kernel it found (``flexattn/call_cache.py`` keeps a
repeat call's launches so).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import driver
from triton.runtime.jit import JITFunction


@dataclass(frozen=True)
class _Entry:
    kernel: Any  # triton.compiler.CompiledKernel
    tail: tuple  # the keyword (constexpr) arguments in the kernel's parameter order
    pinned: tuple  # objects whose identities are in the key (kept alive while the entry lives)


@dataclass(frozen=True)
class Launch:
    """One launch as :func:`recording` saw it: ``cache.launch(grid, key, args, lambda: keywords, pinned)``
    repeats it. ``call_ints``: ``(index into args, name)`` of the unspecialised int arguments that
    are a call's own values (``"q_offset"``: an int ``Positions.q_offset``), which a repeat of the
    launch may take anew without changing its key."""

    cache: LaunchCache
    grid: tuple[int, int, int]
    key: tuple
    args: tuple
    keywords: dict
    pinned: tuple
    call_ints: tuple[tuple[int, str], ...] = ()


_RECORDING = threading.local()  # .launches: the list this thread's launches go to, or absent


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """The launches this thread makes through any :class:`LaunchCache` while active (those that
    returned: a launch that raised is not in the list). Nested recordings see only their own."""
    outer = getattr(_RECORDING, "launches", None)
    launches: list[Launch] = []
    _RECORDING.launches = launches
    try:
        yield launches
    finally:
        _RECORDING.launches = outer


class LaunchCache:
    """Compiled kernels of one ``@triton.jit`` function by the launcher's key (bounded LRU).

    ``launch(grid, key, args, keywords, pinned, call_ints)``: ``args`` are the positional arguments
    in parameter order; ``keywords()`` returns the rest of the parameters (constexprs) and Triton's
    launch options (``num_warps``, ``num_stages``, ``maxnreg``) by name, and is called only when
    Triton binds them (a miss). ``key`` must determine those and everything ``JITFunction.run``
    specialises on for ``args``, except the state read here (the current device, Triton's debug
    and instrumentation knobs); ``pinned`` are the objects whose ``id`` is in the key;
    ``call_ints`` (for :func:`recording`) the call's own int arguments, see :class:`Launch`.
    """

    def __init__(self, fn, size: int = 256):
        self.fn = fn
        self.size = size
        self.direct = isinstance(fn, JITFunction)  # the interpreter's functions have no compiled kernel
        self.generation = 0  # counts clear(): a Relaunch holding an entry goes through launch() after one
        self._names = [p.name for p in fn.params] if self.direct else []
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.generation += 1

    def launch(
        self, grid: tuple[int, int, int], key: tuple, args: tuple, keywords: Callable[[], dict], pinned=(),
        call_ints: tuple[tuple[int, str], ...] = (),
    ):  # fmt: skip
        launches = getattr(_RECORDING, "launches", None)
        if launches is not None:
            kwargs = keywords()
            kernel = self._launch(grid, key, args, lambda: kwargs, pinned)
            launches.append(Launch(self, grid, key, args, kwargs, tuple(pinned), call_ints))
            return kernel
        return self._launch(grid, key, args, keywords, pinned)

    def _launch(self, grid, key, args, keywords, pinned):
        state = self._state()
        if state is None:
            return self.fn[grid](*args, **keywords())
        key = (*state, key)
        entry = self._entries.get(key)
        if entry is None:
            kwargs = keywords()
            kernel = self.fn[grid](*args, **kwargs)
            if kernel is not None and not hasattr(kernel, "result"):  # compiled (not still compiling)
                self._remember(key, kernel, kwargs, len(args), pinned)
            return kernel
        try:  # noqa: SIM105 (contextlib.suppress costs a context manager per launch)
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile: the entry in hand still serves
            pass
        return _run(entry, grid, state[0], args)

    def _state(self) -> tuple | None:
        """``(current device, Triton's debug knob, instrumentation mode)``, the state a compiled
        kernel is found under besides the key; None where every launch goes through Triton (the
        interpreter, pre-run hooks, launch hooks: a profiler's hooks get their launch metadata)."""
        if not self.direct or self.fn.pre_run_hooks:
            return None
        runtime = knobs.runtime
        if not (_no_hooks(runtime.launch_enter_hook) and _no_hooks(runtime.launch_exit_hook)):
            return None
        return (driver.active.get_current_device(), runtime.debug, knobs.compilation.instrumentation_mode)

    def _remember(self, key: tuple, kernel, kwargs: dict, positional: int, pinned: tuple) -> None:
        tail = tuple(kwargs[name] for name in self._names[positional:])
        with self._lock:
            self._entries[key] = _Entry(kernel, tail, tuple(pinned))
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _run(entry: _Entry, grid: tuple, device, args: tuple):
    kernel = entry.kernel
    stream = driver.active.get_current_stream(device)
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
               *args, *entry.tail)  # fmt: skip
    return kernel


class Relaunch:
    """A recorded :class:`Launch` made again with new arguments of the same kind
    (``flexattn/call_cache.py``): ``relaunch(args)`` is ``cache.launch(grid, key, args, ...)``, but
    holds the compiled kernel that launch found and calls it directly while the state it was found
    under holds and the cache was not cleared since (no key to build and look up)."""

    __slots__ = ("cache", "grid", "key", "keywords", "pinned", "_found")

    def __init__(self, launch: Launch):
        self.cache, self.grid, self.key = launch.cache, launch.grid, launch.key
        self.keywords, self.pinned = launch.keywords.copy, launch.pinned
        self._found = None  # (state, entry, generation) of the last launch that found an entry

    def __call__(self, args: tuple):
        cache, found = self.cache, self._found
        if found is not None and found[2] == cache.generation:
            state = cache._state()
            if state == found[0]:
                return _run(found[1], self.grid, state[0], args)
        kernel = cache.launch(self.grid, self.key, args, self.keywords, self.pinned)
        state = cache._state()
        entry = None if state is None else cache._entries.get((*state, self.key))
        self._found = None if entry is None else (state, entry, cache.generation)
        return kernel


def _no_hooks(hook) -> bool:
    """No launch hook installed (Triton 3.6 keeps an empty ``HookChain``; earlier versions None)."""
    return hook is None or (isinstance(hook, HookChain) and not hook.calls)


def args_key(args: tuple) -> tuple:
    """A compiled mod's runtime arguments as Triton specialises on them, or more: each tensor's
    dtype and alignment, every int (sizes and strides) by value."""
    return tuple([(a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args])


def broadcast_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A 4-D tensor's strides with 0 on size-1 dims (B, H, L, E), as the kernels take them: a
    broadcast batch or head then reads the same rows."""
    (s0, s1, s2, s3), (n0, n1, n2, n3) = t.stride(), t.shape  # unpacked, no loop (a hot path)
    return (s0 if n0 > 1 else 0, s1 if n1 > 1 else 0, s2 if n2 > 1 else 0, s3 if n3 > 1 else 0)


def alignment(*tensors) -> tuple[int, ...]:
    """Each tensor's address modulo 16 (Triton specialises pointers on 16-byte alignment)."""
    return tuple([t.data_ptr() % 16 for t in tensors])
