"""The compiler's trace-time checks, for every backend: one mod, one set of refusals.

The reference backend and ``create_block_mask`` evaluate mods with ``torch.vmap``, which accepts
some things the kernels cannot express (``score += 1``) and fails on others with raw errors (a
Python ``if``: a vmap error 22 frames deep). So every backend first traces the mod with the
compiler's tracer, on the grid it will be evaluated on: a mod is refused everywhere with the same
``ModCompileError`` (source line and hint), or ``ModIndexError`` for a gather that is certainly out
of range (``index_ranges.py``), before any work is done.

Repeat checks of an unchanged mod on the same grid are a dictionary lookup (``fingerprint.mod_key``;
the entries hold only weak references, like ``kernel_mod_cache.py``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from flexattn.compiler.fingerprint import Fingerprint, fingerprint_of, guard
from flexattn.compiler.trace import trace
from flexattn.mod_eval import set_vmap_check

_SIZE = 1024
_PASSED: OrderedDict[tuple, tuple] = OrderedDict()  # key -> weak references to the key's objects
_NEEDS_VMAP: OrderedDict[tuple, bool] = OrderedDict()  # fingerprint keys of mods needs_vmap names
_LOCK = threading.Lock()


def check_mod(
    mod, kind: str, grid: tuple[int, int, int, int], device=None, *, fingerprint: Fingerprint | None = None
) -> None:
    """Refuse ``mod`` as the kernels would, for evaluation on ``grid`` = (B, H, Q_LEN, KV_LEN).

    ``kind`` is "score" or "mask"; ``mod=None`` passes. Raises ``ModCompileError`` (a construct no
    backend supports: Python control flow on a traced value, ``.item()``, in-place updates, a
    non-scalar result, ...) or ``ModIndexError`` (a gather outside a captured tensor for some
    element of the grid). ``device``: what the mod's values report as ``.device``. ``fingerprint``:
    the mod's, if the caller already computed it this call (``fingerprint.fingerprint``).

    Example:
        >>> check_mod(lambda b, h, q, kv: q >= kv, "mask", (1, 1, 128, 128))
    """
    if mod is None:
        return
    fingerprint = fingerprint_of(mod, fingerprint)
    key, keep = fingerprint.key, fingerprint.keep
    if key is not None:
        key = (kind, tuple(grid), None if device is None else str(torch.device(device)), key)
        if _passed(key):
            return
    B, H, q_len, kv_len = grid
    program = trace(mod, kind, device, sizes={"b": B, "h": H, "q_idx": q_len, "kv_idx": kv_len})
    if program.needs_vmap and fingerprint.key is not None:
        with _LOCK:
            _NEEDS_VMAP[fingerprint.key] = True
            while len(_NEEDS_VMAP) > _SIZE:
                _NEEDS_VMAP.popitem(last=False)
    if key is not None and not program.read_tensor_values:
        _remember(key, keep)


def needs_vmap(mod) -> bool:
    """Whether ``mod``, as traced by ``check_mod``, evaluates differently on broadcast index grids
    than under vmap (a gathered row indexed again: ``table[h][q_idx]``); ``mod_eval.vmap_mod`` then
    keeps it on vmap while torch.compile traces (a trace-time constant there: custom_ops marks it).
    By the mod's fingerprint, so a re-created closure that ``check_mod`` skips still counts."""
    key = fingerprint_of(mod, None).key
    with _LOCK:
        return key is not None and key in _NEEDS_VMAP


def _passed(key: tuple) -> bool:
    with _LOCK:
        guards = _PASSED.get(key)
        if guards is None:
            return False
        if any(guard() is None for guard in guards):  # an object of the key died: its id may be reused
            del _PASSED[key]
            return False
        _PASSED.move_to_end(key)
        return True


def _remember(key: tuple, keep: tuple) -> None:
    guards = tuple(guard(obj) for obj in keep)
    with _LOCK:
        _PASSED[key] = guards
        while len(_PASSED) > _SIZE:
            _PASSED.popitem(last=False)


def clear() -> None:
    with _LOCK:
        _PASSED.clear()
        _NEEDS_VMAP.clear()


set_vmap_check(needs_vmap)
