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
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
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


class LaunchCache:
    """Compiled kernels of one ``@triton.jit`` function by the launcher's key (bounded LRU).

    ``launch(grid, key, args, keywords, pinned)``: ``args`` are the positional arguments in
    parameter order; ``keywords()`` returns the rest of the parameters (constexprs) and Triton's
    launch options (``num_warps``, ``num_stages``, ``maxnreg``) by name, and is called only when
    Triton binds them (a miss). ``key`` must determine those and everything ``JITFunction.run``
    specialises on for ``args``, except the state read here (the current device, Triton's debug
    and instrumentation knobs); ``pinned`` are the objects whose ``id`` is in the key.
    """

    def __init__(self, fn, size: int = 256):
        self.fn = fn
        self.size = size
        self.direct = isinstance(fn, JITFunction)  # the interpreter's functions have no compiled kernel
        self._names = [p.name for p in fn.params] if self.direct else []
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def launch(
        self, grid: tuple[int, int, int], key: tuple, args: tuple, keywords: Callable[[], dict], pinned=()
    ):
        if not self.direct or self.fn.pre_run_hooks:
            return self.fn[grid](*args, **keywords())
        runtime = knobs.runtime
        if not (_no_hooks(runtime.launch_enter_hook) and _no_hooks(runtime.launch_exit_hook)):
            return self.fn[grid](*args, **keywords())  # a profiler's hooks get their launch metadata
        device = driver.active.get_current_device()
        key = (device, runtime.debug, knobs.compilation.instrumentation_mode, key)
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
        kernel = entry.kernel
        stream = driver.active.get_current_stream(device)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *entry.tail)  # fmt: skip
        return kernel

    def _remember(self, key: tuple, kernel, kwargs: dict, positional: int, pinned: tuple) -> None:
        tail = tuple(kwargs[name] for name in self._names[positional:])
        with self._lock:
            self._entries[key] = _Entry(kernel, tail, tuple(pinned))
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


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
