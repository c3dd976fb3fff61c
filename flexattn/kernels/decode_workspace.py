"""The decode kernel's split workspace, reused by the next call that is ordered after it.

``_decode_split_kernel`` writes each split's partial ``(out, lse, max)`` into fp32 buffers that
``_decode_merge_kernel`` (or, with the fused merge, the split kernel's last program per tile) reads;
nothing else touches them and no call returns them. Allocating them
per call costs three ``torch.empty`` (a few microseconds each on CUDA); a decode loop asks for the
same shapes every step, so :func:`decode_workspace` keeps them.

The rule that keeps a reused workspace from being written while a launch still reads it:

- A workspace is reused only by a call **from the same thread on the same stream** (the key holds
  both, with the device and the shapes). On one stream a call's split kernel runs after the
  previous call's merge (kernel), its last reader, so the reuse is ordered by the stream itself. Two
  streams, or two threads interleaving their launches on one stream, get separate workspaces.
- **Never while a CUDA graph is being captured** on the current stream: a captured launch would
  bake the buffer's address into the graph, whose replays (on any stream, at any time) would then
  race with eager calls. Captures allocate their workspace from the graph's own pool, as any
  tensor made during capture, and it is not remembered.

CPU tensors (Triton's interpreter, or the simulated launch of ``benchmarks/bench_host.py``) run
synchronously; the thread key alone separates concurrent calls there.

At most ``WORKSPACE_ENTRIES`` workspaces are kept (least recently used first out); :func:`clear`
frees them all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

WORKSPACE_ENTRIES = 8


@dataclass(frozen=True)
class DecodeWorkspace:
    """Partial results of the key splits (contiguous fp32): ``out`` (S, B, Hq, Lq, Ev), ``lse`` and
    ``max_scores`` (S, B, Hq, Lq) for S splits; ``arrivals`` int32 (B * Hq * Lq,), zero between calls:
    the fused merge counts each tile's finished splits in it (a tile's last program zeroes it again)."""

    out: torch.Tensor
    lse: torch.Tensor
    max_scores: torch.Tensor
    arrivals: torch.Tensor


_WORKSPACES: OrderedDict[tuple, DecodeWorkspace] = OrderedDict()
_LOCK = threading.Lock()


def decode_workspace(
    splits: int, batch: int, q_heads: int, q_len: int, v_head_dim: int, device
) -> DecodeWorkspace:
    """The workspace for ``splits`` splits of a (batch, q_heads, q_len, v_head_dim) output on
    ``device`` (a ``torch.device``): the one this thread last used on the current stream for these
    shapes, or a new one (the module docstring gives the rule)."""
    shape = (splits, batch, q_heads, q_len)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.is_current_stream_capturing():
            return _allocate(shape, v_head_dim, device)
        stream = torch._C._cuda_getCurrentRawStream(index)
        key = (threading.get_ident(), index, stream, shape, v_head_dim)
    else:
        key = (threading.get_ident(), device, shape, v_head_dim)
    workspace = _WORKSPACES.get(key)
    if workspace is None:
        workspace = _allocate(shape, v_head_dim, device)
        with _LOCK:
            _WORKSPACES[key] = workspace
            while len(_WORKSPACES) > WORKSPACE_ENTRIES:
                _WORKSPACES.popitem(last=False)
    else:
        try:  # noqa: SIM105 (contextlib.suppress costs a context manager per call)
            _WORKSPACES.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile: the workspace in hand still serves
            pass
    return workspace


def clear() -> None:
    """Forget every kept workspace (their memory returns to torch's allocator)."""
    with _LOCK:
        _WORKSPACES.clear()


def kept() -> int:
    """How many workspaces are kept now."""
    return len(_WORKSPACES)


def _allocate(shape: tuple[int, ...], v_head_dim: int, device) -> DecodeWorkspace:
    out = torch.empty((*shape, v_head_dim), dtype=torch.float32, device=device)
    lse = torch.empty(shape, dtype=torch.float32, device=device)
    # (a grid's dim 1 is Hq // PACK row-tile groups of at most PACK * Lq rows each: <= Hq * Lq slots per b)
    arrivals = torch.zeros(shape[1] * shape[2] * shape[3], dtype=torch.int32, device=device)
    return DecodeWorkspace(out, lse, torch.empty_like(lse), arrivals)
