"""TMA bulk reduce-add from shared memory, for Gluon kernels (Triton 3.6's Gluon ``tma`` module has
loads and stores only).

``async_reduce_add(desc, coord, src)`` issues ``cp.reduce.async.bulk.tensor`` (``ttng.async_tma_reduce``
with kind ADD): the TMA unit adds the shared-memory tile ``src`` into the box of ``desc`` at ``coord``,
atomically per element, in L2 — how FlashAttention-3 sums dQ. Like ``tma.async_copy_shared_to_global``
it is asynchronous: ``tma.store_wait(n)`` waits until at most n of the thread's bulk groups still read
their source, so ``src`` may be written again only after one. (The register form, Triton's
``tt.descriptor_reduce``, waits for its staging buffer right after each reduction; measured 0.8x the
per-thread reductions on the H200: BENCHMARKS.md, sixteenth session.)
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental.gluon.language import _core as ttgl


@ttgl.builtin
def async_reduce_add(desc, coord, src, _semantic=None):
    """Add the shared-memory tile ``src`` (the descriptor's block shape and layout) into the box of
    ``desc`` at ``coord`` (one int per dim) by TMA, asynchronously (``tma.store_wait`` completes it)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)
