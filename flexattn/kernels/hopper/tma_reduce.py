"""A TMA bulk reduce-add from registers, for Gluon kernels (Triton 3.6's Gluon ``tma`` module has loads
and stores only).

``tma_add(desc, offsets, value)`` emits Triton's ``tt.descriptor_reduce`` (add), the op behind
``tl.tensor_descriptor.atomic_add``; the Gluon pipeline's TMA lowering (``add_tma_lowering``) turns it
into a shared-memory staging buffer and ``cp.reduce.async.bulk.tensor`` (one bulk reduction of the
whole box into global memory, done by the TMA unit in L2), as FlashAttention-3 sums dQ.
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental.gluon.language import _core as ttgl


@ttgl.builtin
def tma_add(desc, offsets, value, _semantic=None):
    """Add ``value`` (a register tensor shaped like the descriptor's block) into the box of ``desc`` at
    ``offsets`` (one int per dim), atomically per element, by TMA."""
    offsets = _semantic._convert_to_ir_values(offsets, require_i64=False)
    handle = _semantic.builder.create_descriptor_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, value.handle, offsets
    )
    return ttgl.tensor(handle, ttgl.void)
