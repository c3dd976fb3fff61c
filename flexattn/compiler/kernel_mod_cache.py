"""Compiled mods by fingerprint (``fingerprint.mod_key``), holding nothing of the user's alive.

A training loop that builds a new bias tensor and a new closure over it every step must not have
every old tensor pinned in (GPU) memory by this cache. So an entry keeps only weak references:

- to the objects whose identities are in the key (tensors, code objects, modules, ...): once one of
  them is gone its id may name another object, and the entry is dropped on the next lookup;
- to the captured tensors of the cached ``KernelMod`` (``captures``); a hit binds the live tensors
  again (``binding.bind_captures``). A hit means the mod being compiled holds those same tensors.

Entries are evicted least recently used beyond ``size``.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict

from flexattn.compiler.binding import bind_captures
from flexattn.compiler.fingerprint import guard
from flexattn.kernels.mods import KernelMod


@dataclasses.dataclass(frozen=True)
class _Entry:
    kernel_mod: KernelMod  # captures held as weak references, args rebuilt on a hit
    guards: tuple  # weak references to the objects whose identities are in the key
    whole: KernelMod | None  # a mod that captures no tensor, held as it is: a hit returns it unchanged


def _freeze(kernel_mod: KernelMod) -> KernelMod:
    """The KernelMod without its tensors: ``captures`` become weak references, ``args`` empty."""
    return dataclasses.replace(
        kernel_mod,
        args=(),
        grad_captures=(),
        make_grad_args=None,
        captures=tuple(weakref.ref(t) for t in kernel_mod.captures),
    )


def _thaw(frozen: KernelMod) -> KernelMod | None:
    """The KernelMod with its tensors back, or None if one of them is gone."""
    captures = tuple(ref() for ref in frozen.captures)
    if any(t is None for t in captures):
        return None
    return bind_captures(frozen, captures, check=False)


class KernelModCache:
    """A bounded LRU map from mod fingerprints to KernelMods that keeps no user object alive."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        """Whether ``key`` has an entry whose keyed objects are all alive (it is not refreshed)."""
        entry = self._entries.get(key)
        return entry is not None and all(ref() is not None for ref in entry.guards)

    def get(self, key: tuple) -> KernelMod | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            kernel_mod = None
            if all(guard() is not None for guard in entry.guards):
                kernel_mod = entry.whole or _thaw(entry.kernel_mod)
            if kernel_mod is None:  # an object of the key died: its id may now be another's
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return kernel_mod

    def put(self, key: tuple, kernel_mod: KernelMod, keep) -> None:
        """Store ``kernel_mod`` under ``key``; ``keep``: the objects whose identities are in the key."""
        whole = None if kernel_mod.captures else kernel_mod
        entry = _Entry(_freeze(kernel_mod), tuple(guard(obj) for obj in keep), whole)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
