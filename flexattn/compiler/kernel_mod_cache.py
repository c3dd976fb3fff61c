"""Compiled mods by fingerprint (``fingerprint.mod_key``), holding nothing of the user's alive.

A training loop that builds a new bias tensor and a new closure over it every step must not have
every old tensor pinned in (GPU) memory by this cache. So an entry keeps only weak references:

- to the objects whose identities are in the key (tensors, code objects, modules, ...): once one of
  them is gone its id may name another object, and the entry is dropped on the next lookup;
- to the captured tensors inside the cached ``KernelMod`` (its ``args`` and ``grad_captures``), which
  a hit rebuilds from the live tensors. A hit means the mod being compiled holds those same tensors.

Entries are evicted least recently used beyond ``size``.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict

import torch

from flexattn.kernels.mods import KernelMod


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # not weak-referenceable: hold it (small immutable objects only reach here)
        return lambda: obj


@dataclasses.dataclass(frozen=True)
class _Entry:
    kernel_mod: KernelMod  # args and grad_captures hold weak references instead of tensors
    guards: tuple  # weak references to the objects whose identities are in the key


class _TensorRef(weakref.ref):
    """A captured tensor inside a frozen KernelMod (tells it apart from the encoded ints)."""


def _freeze(kernel_mod: KernelMod) -> KernelMod:
    args = tuple(_TensorRef(a) if isinstance(a, torch.Tensor) else a for a in kernel_mod.args)
    return dataclasses.replace(
        kernel_mod, args=args, grad_captures=tuple(_TensorRef(t) for t in kernel_mod.grad_captures)
    )


def _thaw(frozen: KernelMod) -> KernelMod | None:
    """The KernelMod with its tensors back, or None if one of them is gone."""
    args = tuple(a() if isinstance(a, _TensorRef) else a for a in frozen.args)
    grad_captures = tuple(ref() for ref in frozen.grad_captures)
    if any(a is None for a in args) or any(t is None for t in grad_captures):
        return None
    return dataclasses.replace(frozen, args=args, grad_captures=grad_captures)


class KernelModCache:
    """A bounded LRU map from mod fingerprints to KernelMods that keeps no user object alive."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> KernelMod | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            kernel_mod = None
            if all(guard() is not None for guard in entry.guards):
                kernel_mod = _thaw(entry.kernel_mod)
            if kernel_mod is None:  # an object of the key died: its id may now be another's
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return kernel_mod

    def put(self, key: tuple, kernel_mod: KernelMod, keep: list) -> None:
        """Store ``kernel_mod`` under ``key``; ``keep``: the objects whose identities are in the key."""
        entry = _Entry(_freeze(kernel_mod), tuple(_weak(obj) for obj in keep))
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
