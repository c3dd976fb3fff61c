"""Prepared calls: a repeat eager inference call goes straight to the kernel launches it made before.

A decode step, or a layer of a model, calls ``flex_attention`` again and again with tensors of the
same kind, the same mods and the same BlockMask. Every call whose key (:func:`lookup`) has no entry
runs the whole host path (the API's checks, the mods' trace-time checks and compile lookups, the
plan, the kernel choice, the launchers' checks and launch keys); the second such call of a key does
so while ``kernels.launch.recording`` collects its launches, and this module keeps them as an
``_Entry`` (recording only a repeated key, a stream of keys that never repeat costs no recording
and evicts no entry). A later call with the same key allocates its output and repeats those
launches with its own tensors in place of the recorded call's (``kernels.launch.Relaunch``: the
compiled kernels found then, while Triton's state is unchanged): nothing is checked, planned or
chosen again, and each mod is fingerprinted once.

The key holds everything the skipped host path reads, or the call is not kept (it runs the whole
path, as before):

- the thread, and on CUDA the current device and stream (the decode kernel's split workspace is
  reused on that rule, ``kernels/decode_workspace.py``); while a CUDA graph is being captured
  nothing is looked up or kept;
- query, key and value: exactly ``torch.Tensor``, by shape, strides, dtype, device, requires_grad
  and the data pointer's alignment (Triton specialises on it). A call passing one tensor twice
  (``q is k``) is served, never recorded (which one a launch read cannot be told apart);
- each mod by its fingerprint (``compiler/fingerprint.py``: code, closure, globals, captured tensors
  by identity, version, shape, strides, dtype, device, requires_grad); a mod it cannot describe is
  not kept, nor one whose trace read tensor values (``compiler.is_remembered``);
- the BlockMask (``BlockMask`` or ``PagedBlockMask``; PyTorch's is converted anew every call) by
  identity, ``seq_lengths``, the identity of its ``block_tables``, the version of each kv-side
  table (an in-place edit is a miss), its ``mask_mod`` (fingerprint), its page table (identity,
  version); tables, page tables or captures made under ``torch.inference_mode`` have no version
  counter (an in-place edit could not be seen), so calls reading them are not kept;
- Positions by form: tensors on a GPU by their metadata (the kernels read their values; the host
  reads none), ``q_offset`` 0 and ``kv_offset`` by value, a nonzero int ``q_offset`` by type: it
  is one of the call's values, which a hit passes to the launches that declare it theirs
  (``kernels.launch.Launch.call_ints``: the decode kernel's unspecialised offset). Its key serves
  ``0 <= q_offset`` and ``q_offset + Lq`` up to :func:`offset_bound` (the BlockMask's Q_LEN, which
  the whole path enforces, else the longer of Lq and Lkv), and the call is recorded only if its mods
  pass their index checks over that whole range (``api._checked_for_every_offset``); other offsets
  run the whole path, which checks them. CPU tensors (``Positions.check`` reads their values) are
  not kept;
- kernel_options by every item's name, type and value; scale and enable_gqa by type and value;
  ``torch.is_grad_enabled()``; torch's TF32 switch for fp32 inputs; for CPU tensors
  ``TRITON_INTERPRET`` (the whole path reads it on every call: without it a Triton call on CPU
  tensors raises).

Only inference calls are kept (no output requires grad: a call that needs gradients runs the whole
path and ``FlexAttentionFunction`` every time), and only calls whose work is all in launches through
``LaunchCache``, each kernel once: the Triton forward or the split-KV decode kernels, not an
autotuning call. A Gluon prefill forward (``kernels/hopper``: by default at E128 and over paged
caches on sm_90) launches outside ``LaunchCache``, so its calls take the whole path every time.

An entry holds nothing of the user's alive: the keyed objects (mask, tables, page table, the mods'
fingerprinted objects) and every tensor the launches read that the call does not pass (the tables,
the mods' captured tensors, the split workspace, the every-block-full tables) are weak references;
a hit needs all of them alive, and each of the user's at the data pointer it had, the tables and the
page table also of the shape, strides and dtype they had (a ``.data`` swap keeps the version, and a
swap to a view can keep the data pointer; the mods' captures are keyed by shape already), else the
entry is dropped. lse and max_scores that a call does not return go
to two small buffers of the entry (up to ``SCRATCH_BYTES``: decode sizes), written only by its own
launches from its thread and stream. At most ``SIZE`` entries, least recently used first out;
:func:`clear` forgets them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from flexattn.block_mask import BlockMask, noop_mask

SIZE = 128
SEEN_SIZE = 4 * SIZE  # keys remembered as missed once
SCRATCH_BYTES = 64 * 1024  # an entry keeps buffers for the lse / max_scores a call does not return up to this


class Call:
    """A call not served from a kept entry: its key and what recording it needs of it."""

    __slots__ = ("key", "tensors", "keep", "mods", "offset_bound", "record")

    def __init__(self, key: tuple, tensors: tuple, keep: list, mods: tuple, offset_bound, record: bool):
        self.key = key
        self.tensors = tensors  # what the launches take from this call: q, k, v, then position values
        self.keep = keep  # the objects whose identities are in the key
        self.mods = mods  # the fingerprints of score_mod and mask_mod (None where no mod to key)
        # with an int q_offset: the bound on q_offset + Lq that every hit of the key meets; the mods
        # must pass their index checks over it before the call is recorded (api.py), or it is not
        self.offset_bound = offset_bound
        self.record = record  # the key missed before: record this call's launches

    @property
    def fingerprints(self):
        """The mods' ``compiler.fingerprint.CallFingerprints``, or None without a mod to key."""
        if self.mods == (None, None):
            return None
        from flexattn.compiler.fingerprint import CallFingerprints

        return CallFingerprints(*self.mods)


class _Args:
    """One launch's argument tuple: ``base`` (the constants), with ``fills`` ``(index, source)``
    put in from the call's values (its tensors, then the entry's fixed tensors): ``source`` an
    index into them, or a builder of its own (a mod's argument tuple, a tensor descriptor)."""

    __slots__ = ("base", "fills")

    def __init__(self, base: list, fills: list):
        self.base, self.fills = base, fills

    def build(self, values: tuple) -> tuple:
        args = self.base.copy()
        for index, source in self.fills:
            args[index] = values[source] if type(source) is int else source.build(values)
        return tuple(args)


class _Descriptor:
    """A tensor descriptor over one of the call's tensors (the forward's K/V through TMA), of the
    recorded shape, strides and block shape (the key fixes the tensor's)."""

    __slots__ = ("source", "block_shape", "shape", "strides", "make")

    def __init__(self, source: int, made, make: Callable):
        self.source, self.make = source, make
        self.block_shape = list(made.block_shape)
        self.shape, self.strides = list(made.shape), list(made.strides)

    def build(self, values: tuple):
        return self.make(values[self.source], self.block_shape, self.shape, self.strides)


class _Entry:
    """A prepared call: ``run`` allocates its outputs and repeats its launches."""

    __slots__ = (
        "guards", "fixed", "pointers", "layouts", "out", "stat_shape", "stat_stride", "scratch", "launches",
    )  # fmt: skip

    def __init__(self, guards, fixed, pointers, layouts, out: torch.Tensor, lse: torch.Tensor, launches):
        self.guards = guards  # weak references to the key's objects
        self.fixed = fixed  # weak references to the tensors the launches read that the call does not pass
        self.pointers = pointers  # (index into fixed, data pointer when recorded) of the user's ones
        self.layouts = layouts  # (index into fixed, (shape, strides, dtype)) of the tables and page table
        self.out = (out.shape, out.stride(), out.dtype)
        self.stat_shape, self.stat_stride = lse.shape, lse.stride()  # lse and max_scores (fp32)
        # lse / max_scores a call does not return go to buffers kept here, when small (decode sizes):
        # only this entry's launches write them, from one thread on one stream (the key's)
        self.scratch = None
        if lse.numel() * 4 <= SCRATCH_BYTES:
            scratch = (torch.empty_like(lse), torch.empty_like(lse))
            if not (scratch[0].data_ptr() | scratch[1].data_ptr()) & 15:
                self.scratch = scratch
        self.launches = launches

    def run(self, tensors: tuple, want_lse: bool, want_max: bool) -> tuple | None:
        """``(out, lse, max_scores)``, or None when a weakly held object died or moved."""
        for guard in self.guards:
            if guard() is None:
                return None
        fixed = []
        for ref in self.fixed:
            t = ref()
            if t is None:
                return None
            fixed.append(t)
        for index, pointer in self.pointers:  # (a ``.data`` swap moves a tensor without a new version)
            if fixed[index].data_ptr() != pointer:
                return None
        for index, layout in self.layouts:  # (or reshapes it in place: ``t.data = t.data[:, :1]``)
            t = fixed[index]
            if (t.shape, t.stride(), t.dtype) != layout:
                return None
        device = tensors[0].device
        shape, stride, dtype = self.out
        out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        # (an allocator that does not align to 16 bytes: Triton specialises on it)
        unaligned = out.data_ptr() & 15
        lse, max_scores = self.scratch or (None, None)  # (aligned: checked when made)
        if want_lse or lse is None:
            lse = torch.empty_strided(self.stat_shape, self.stat_stride, dtype=torch.float32, device=device)
            unaligned |= lse.data_ptr() & 15
        if want_max or max_scores is None:
            max_scores = torch.empty_strided(
                self.stat_shape, self.stat_stride, dtype=torch.float32, device=device
            )
            unaligned |= max_scores.data_ptr() & 15
        if unaligned:
            return None
        q, k, v, *places = tensors
        values = (q, k, v, out, lse, max_scores, *places, *fixed)
        for relaunch, args in self.launches:
            relaunch(args.build(values))
        return out, lse, max_scores


_ENTRIES: OrderedDict[tuple, _Entry] = OrderedDict()
_SEEN: OrderedDict[tuple, None] = OrderedDict()  # keys that missed once (``_seen_before``)
_LOCK = threading.Lock()
_NOT_CACHED = (None, None)


class _Unprepared(Exception):
    """A call this module cannot prepare (it runs the whole host path every time)."""


def lookup(
    query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, positions, *,
    lse: bool = True, max_scores: bool = True,
) -> tuple:  # fmt: skip
    """``(outputs, None)``: the call's ``(out, lse, max_scores)`` from kept launches; ``(None, call)``:
    run the whole host path and record it (:func:`recording`, :func:`remember`); ``(None, None)``:
    not cached (the module docstring lists what the key holds). ``lse`` / ``max_scores``: the call
    returns them (else they may go to kept buffers)."""
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor:
        return _NOT_CACHED
    # (True == 1 and hash(True) == hash(1): a bool scale or an int enable_gqa must not meet a kept key)
    if scale is not None and type(scale) is not float and type(scale) is not int:
        return _NOT_CACHED
    if type(enable_gqa) is not bool:
        return _NOT_CACHED
    try:
        found = _key(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, positions)
        entry = _ENTRIES.get(found[0])
    except (_Unprepared, RuntimeError, TypeError, AttributeError):  # e.g. an unhashable option value
        return _NOT_CACHED
    call_key, tensors = found[0], found[1]
    if entry is not None:
        outputs = entry.run(tensors, lse, max_scores)
        if outputs is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs a context manager per call)
                _ENTRIES.move_to_end(call_key)
            except KeyError:  # evicted by another thread meanwhile
                pass
            return outputs, None
        _drop(call_key)
    return None, Call(*found, _seen_before(call_key))


def _seen_before(call_key: tuple) -> bool:
    """Whether ``call_key`` missed before (else it is noted now): a call is recorded the second time
    its key misses, so that keys that never repeat cost no recording and evict no entry."""
    if call_key in _SEEN:
        return True
    with _LOCK:
        _SEEN[call_key] = None
        while len(_SEEN) > SEEN_SIZE:
            _SEEN.popitem(last=False)
    return False


def _key(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, positions) -> tuple:
    """``(key, call tensors, keep, mods)``, as :class:`Call` holds them."""
    device = query.device
    if device.type == "cuda":
        # (torch.cuda.is_current_stream_capturing / current_device without their Python wrappers:
        # a CUDA tensor means CUDA is initialised)
        if torch._C._cuda_isCurrentStreamCapturing():
            raise _Unprepared
        current = torch._C._cuda_getDevice()
        index = current if device.index is None else device.index
        where = (threading.get_ident(), current, torch._C._cuda_getCurrentRawStream(index))
    else:
        where = (threading.get_ident(), os.environ.get("TRITON_INTERPRET"))
    score = mask = places = options = score_fp = mask_fp = bound = None
    if positions is None:  # (what may refuse the call comes before the fingerprints)
        tensors = (query, key, value)
    else:
        tensors = [query, key, value]
        places, bound = _positions_key(positions, tensors, query.shape[2], key.shape[2], block_mask)
        tensors = tuple(tensors)
    if kernel_options is not None:
        if type(kernel_options) is not dict:
            raise _Unprepared
        options = tuple([(name, type(v), v) for name, v in kernel_options.items()])
    keep: list = []
    if score_mod is not None:
        score_fp = _fingerprint(score_mod, keep)
        score = score_fp.key
    if block_mask is not None:
        mask, mask_fp = _mask_key(block_mask, keep)
    dtype = query.dtype
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    call_key = (
        where, query.shape, query.stride(), dtype, device, query.requires_grad, query.data_ptr() & 15,
        key.shape, key.stride(), key.dtype, key.device, key.requires_grad, key.data_ptr() & 15,
        value.shape, value.stride(), value.dtype, value.device, value.requires_grad, value.data_ptr() & 15,
        score, mask, places, options, scale, enable_gqa, torch.is_grad_enabled(), tf32,
    )  # fmt: skip
    return call_key, tensors, keep, (score_fp, mask_fp), bound


def _meta(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.data_ptr() & 15)


_FINGERPRINT = None  # compiler.fingerprint.fingerprint, imported on first use (import flexattn stays light)


def _fingerprint(mod, keep: list):
    global _FINGERPRINT
    if _FINGERPRINT is None:
        from flexattn.compiler.fingerprint import fingerprint as _FINGERPRINT
    found = _FINGERPRINT(mod)
    if found.key is None:
        raise _Unprepared
    keep += found.keep
    return found


def _mask_key(block_mask, keep: list) -> tuple:
    """``(key part, mask_mod fingerprint or None)`` of a BlockMask."""
    kind = type(block_mask)
    if kind is not BlockMask and not _is_paged_mask(kind):
        raise _Unprepared  # (PyTorch's BlockMask is converted afresh on every call)
    tables = block_mask.block_tables
    full_num, full_idx = tables.full_kv_num_blocks, tables.full_kv_indices
    versions = (
        tables.kv_num_blocks._version, tables.kv_indices._version,
        None if full_num is None else full_num._version, None if full_idx is None else full_idx._version,
    )  # fmt: skip
    mask_mod, mask_fp = block_mask.mask_mod, None
    if mask_mod is noop_mask:
        mod = "noop"
    else:
        mask_fp = _fingerprint(mask_mod, keep)
        mod = mask_fp.key
    pages = getattr(block_mask, "kv_pages", None)
    paged = None
    if pages is not None:
        paged = (id(pages), pages.page_table._version)
        keep.append(pages)
    keep += (block_mask, tables)
    return (kind, id(block_mask), block_mask.seq_lengths, id(tables), versions, mod, paged), mask_fp


def _is_paged_mask(kind: type) -> bool:
    if kind.__name__ != "PagedBlockMask":
        return False
    from flexattn.paged import PagedBlockMask

    return kind is PagedBlockMask


def _positions_key(positions, tensors: list, q_len: int, kv_len: int, block_mask) -> tuple:
    """``(key part, offset bound)``: Positions by form; their GPU tensors and a nonzero int
    ``q_offset`` join the call's values (``tensors``). The int only within the bound every call of
    the key meets (:func:`offset_bound`: ``q_len`` query tokens, ``kv_len`` keys), which the whole
    path's checks of it imply; the bound is returned (None without an int offset)."""
    from flexattn.kernels import positions as where

    if type(positions) is not where.Positions:
        raise _Unprepared
    parts: list = [type(positions.kv_offset), positions.kv_offset]
    offset, bound = positions.q_offset, None
    if type(offset) is int and offset != 0:
        bound = offset_bound(q_len, kv_len, block_mask)
        if offset < 0 or offset + q_len > bound:
            raise _Unprepared  # (the whole path says what is wrong, or runs it unkept)
        parts.append(int)
        tensors.append(offset)
    else:
        parts.append(_position_tensor(offset, tensors, where))
    parts.append(_position_tensor(positions.kv_lengths, tensors, where))
    return tuple(parts), bound


def offset_bound(q_len: int, kv_len: int, block_mask) -> int:
    """The largest ``q_offset + Lq`` a kept call with an int offset serves: the BlockMask's Q_LEN
    (the whole path refuses more), else the longer of Lq and the keys (the range the mods are
    checked over for offsets the host cannot read); within Triton's 32-bit ints either way."""
    bound = block_mask.seq_lengths[0] if block_mask is not None else max(q_len, kv_len)
    return min(bound, 2**31 - 1)


def _position_tensor(value, tensors: list, where):
    """The key part of a Positions field that is None, the int 0 or a GPU tensor (which joins the
    call's values); CPU values are checked per call (not kept)."""
    if value is None or (type(value) is int and value == 0):
        return value
    if type(value) is torch.Tensor and not where.host_readable(value):
        tensors.append(value)
        return _meta(value)
    raise _Unprepared


def recording(call: Call | None):
    """A context collecting the launches of ``call``'s host path (``kernels.launch.recording``);
    nothing for a call that is not cached."""
    if call is None or not call.record:
        return contextlib.nullcontext()
    from flexattn.kernels.launch import recording as launches

    return launches()


def remember(call: Call | None, launches, outputs: tuple, options, dtype: torch.dtype) -> None:
    """Keep ``call``'s recorded ``launches`` (``outputs``: the ``(out, lse, max_scores)`` they
    wrote; ``options``: its KernelOptions) if a repeat of it may run them alone."""
    if call is None or launches is None or not launches or options.PREFILL_KERNEL not in (None, "TRITON"):
        return
    out, lse, max_scores = outputs
    if out.requires_grad or not _plain_outputs(outputs) or not _mods_remembered(call, options, dtype):
        return
    if len({id(launch.cache) for launch in launches}) != len(launches):
        return  # a kernel launched twice (autotuning, a retry): not one launch per kernel
    call_tensors = [*call.tensors[:3], out, lse, max_scores, *call.tensors[3:]]
    ints = [index for index, t in enumerate(call_tensors) if type(t) is int]  # an int q_offset
    tensors = [t for t in call_tensors if type(t) is not int]
    if len({id(t) for t in tensors}) != len(tensors):
        return  # q is k: which of them a launch read cannot be told apart (a hit passes each its own)
    if ints and not any(launch.call_ints for launch in launches):
        return  # the offset went into a launch that does not take it per call
    # (an int's place is keyed by a tuple no id() equals: a later tensor's place is len(places))
    places = {id(t) if type(t) is not int else ("int", index): index for index, t in enumerate(call_tensors)}
    captured, held = _users_tensors(call.keep)
    owned = {id(t) for t in (*captured, *held)}
    if owned & places.keys():
        return  # a call's tensor is also the mask's or a mod's: it must not be swapped per call
    from flexattn.compiler.fingerprint import guard
    from flexattn.kernels.launch import Relaunch

    fixed: list = []
    try:
        prepared = tuple(
            (Relaunch(_constant(launch)), _template(launch.args, places, fixed, _call_ints(launch, ints)))
            for launch in launches
        )
    except _Unprepared:
        return
    guards, refs = tuple(guard(obj) for obj in call.keep), tuple(guard(t) for t in fixed)
    pointers = tuple((i, t.data_ptr()) for i, t in enumerate(fixed) if id(t) in owned)
    held = {id(t) for t in held}  # (the captures' shapes, strides and dtypes are in their mod's key)
    layouts = tuple((i, (t.shape, t.stride(), t.dtype)) for i, t in enumerate(fixed) if id(t) in held)
    entry = _Entry(guards, refs, pointers, layouts, out, lse, prepared)
    with _LOCK:
        _ENTRIES[call.key] = entry
        _ENTRIES.move_to_end(call.key)
        while len(_ENTRIES) > SIZE:
            _ENTRIES.popitem(last=False)
        _SEEN.pop(call.key, None)


def _users_tensors(keep: list) -> tuple[list, list]:
    """The user's tensors among, or held by, the key's objects: ``(the mods' captures, the mask's
    tables and the page table)``."""
    from flexattn.kernels.block_tables import BlockTables
    from flexattn.kernels.paged_kv import PagedKV

    captured, held = [], []
    for obj in keep:
        if isinstance(obj, torch.Tensor):
            captured.append(obj)
        elif isinstance(obj, BlockTables):
            held += [t for t in obj.tensors() if t is not None]
        elif isinstance(obj, PagedKV):
            held.append(obj.page_table)
    return captured, held


def _plain_outputs(outputs: tuple) -> bool:
    """Fresh contiguous outputs at 16-byte aligned addresses, as a hit allocates them."""
    out, lse, max_scores = outputs
    return (
        all(type(t) is torch.Tensor and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in outputs)
        and lse.dtype == max_scores.dtype == torch.float32 and lse.shape == max_scores.shape
    )  # fmt: skip


def _mods_remembered(call: Call, options, dtype) -> bool:
    """Whether the compiled mods are served without a trace (a trace that read tensor values is
    not: its constants may be stale)."""
    score, mask = call.mods
    if score is None and mask is None:
        return True
    from flexattn.compiler import is_remembered
    from flexattn.options import fast_math_for

    fast_math = fast_math_for(options, dtype)
    device = call.tensors[0].device
    return (score is None or is_remembered(score, "score", device=device, fast_math=fast_math)) and (
        mask is None or is_remembered(mask, "mask", device=device)
    )


def _call_ints(launch, ints: list[int]) -> dict[int, int]:
    """``{index into the launch's args: place in the values}`` of the call's int q_offset (``ints``:
    its place, if the call has one) in the arguments the launch declares its call's own."""
    taken = {}
    for index, name in launch.call_ints:
        if name != "q_offset":
            raise _Unprepared
        if ints:
            taken[index] = ints[0]
    return taken


def _template(args: tuple, places: dict[int, int], fixed: list, ints: dict[int, int] | None = None) -> _Args:
    """The builder of ``args``: tensors from their place in the values (``places``: id -> index; the
    call's tensors first, then the fixed ones: a tensor not seen yet is appended to ``fixed``, to be
    weakly held by the entry), tensor descriptors over the call's tensors made anew, the call's ints
    from their place (``ints``: index into args -> place), other constants as they are; anything
    else cannot be prepared."""
    kernel_function, tensor_descriptor, descriptor = _launch_types()
    base = list(args)
    fills: list = [] if not ints else list(ints.items())
    for index, arg in enumerate(args):
        kind = type(arg)
        if kind in _CONSTANTS:
            continue
        if kind is torch.Tensor or isinstance(arg, torch.Tensor):
            source = places.get(id(arg))
            if source is None:
                source = places[id(arg)] = len(places)
                fixed.append(arg)
            fills.append((index, source))
        elif kind is tuple:
            inner = _template(arg, places, fixed)
            if inner.fills:
                fills.append((index, inner))
        elif kind is tensor_descriptor:
            source = places.get(id(arg.base))
            plain = arg.shape == list(arg.base.shape) and arg.strides == list(arg.base.stride())
            if source is None or source >= len(places) - len(fixed) or not plain or arg.padding != "zero":
                raise _Unprepared  # (over one of the call's tensors only)
            fills.append((index, _Descriptor(source, arg, descriptor)))
        elif not isinstance(arg, kernel_function):
            raise _Unprepared
    for index, _ in fills:
        base[index] = None
    return _Args(base, fills)


_CONSTANTS = frozenset((int, float, bool, str, type(None)))  # launch arguments kept as they are


@functools.cache
def _launch_types() -> tuple:
    """Triton's kernel function and tensor descriptor types, and ``kernels.device.descriptor``
    (loaded on first use: import flexattn loads no Triton)."""
    from triton.runtime.jit import KernelInterface
    from triton.tools.tensor_descriptor import TensorDescriptor

    from flexattn.kernels.device import descriptor

    return KernelInterface, TensorDescriptor, descriptor


def _constant(launch):
    """``launch`` if its keywords and pinned objects hold no tensor (an entry keeps them), else
    _Unprepared."""
    if any([isinstance(item, torch.Tensor) for item in (*launch.keywords.values(), *launch.pinned)]):
        raise _Unprepared
    return launch


def _drop(key: tuple) -> None:
    with _LOCK:
        _ENTRIES.pop(key, None)


def clear() -> None:
    """Forget every prepared call (and every key seen once)."""
    with _LOCK:
        _ENTRIES.clear()
        _SEEN.clear()


def kept() -> int:
    """How many prepared calls are kept now."""
    return len(_ENTRIES)
