"""KernelMod: a compiled score_mod / mask_mod as the kernel templates see it.

The mod compiler (``flexattn.compiler``) produces these; the kernels only call them. Calling
conventions (every template follows them, at exactly one place per kernel):

    score = SCORE_FN(score, b, h, q_idx, kv_idx, SCORE_ARGS)                  # fp32, broadcastable
    keep  = MASK_FN(b, h, q_idx, kv_idx, MASK_ARGS)                            # int1, broadcastable
    dscore = SCORE_GRAD_FN(score, b, h, q_idx, kv_idx, dout, SCORE_ARGS, SCORE_GRAD_ARGS)
    dscore = TILE_GRAD_FN(score, b, h, q_idx, kv_idx, q_lo, kv_lo, dout, SCORE_ARGS, SCORE_GRAD_ARGS)
    bias2 = BIAS_FN(b, h, q_idx, kv_idx, SCORE_ARGS)     # additive score mods: f * log2(e), fp32

- ``TILE_GRAD_FN`` (``KernelMod.tile_grad_fn``, set when the mod reads a learnable table at a
  relative position, ``t[h, kv_idx - q_idx + c]``: a "diagonal gather", ``compiler/diagonals.py``)
  is SCORE_GRAD_FN with the raw positions of the tile's first query row and key column: ``q_idx`` /
  ``kv_idx`` must be ``q_lo + 0, 1, ...`` / ``kv_lo + 0, 1, ...`` wrapped into range. On a tile
  whose table indices all lie in the table it sums the gradient per diagonal and adds it with one
  atomic per distinct entry (instead of one per score). A kernel whose tiles are such runs (the
  backward's dK/dV kernel) may call it instead of SCORE_GRAD_FN.

- additive score mods (``score + f(b, h, q_idx, kv_idx)``, ``KernelMod.bias_fn`` set): the kernels
  may skip SCORE_FN and compute base-2 scores as ``qk * (scale * log2e) + BIAS_FN(...)`` (one FMA;
  ``flexattn/compiler/additive.py``); SCORE_GRAD_FN stays the gradient of the mod as written.

- ``score``: fp32 ``[BLOCK_M, BLOCK_N]`` (the scaled q.k product, before the mod).
- ``b``, ``h``: int32 scalars (``h`` is the *query* head), or int32 ``[BLOCK_M, 1]`` vectors when
  a kernel packs several query heads (and sequences) into the rows of one tile (decoding with GQA
  packing); generated code only broadcasts, so both work (``tests/compiler/test_row_heads.py``).
- ``q_idx``: int32 ``[BLOCK_M, 1]`` and ``kv_idx``: int32 ``[1, BLOCK_N]``, absolute positions
  (the backward dK/dV kernel passes the transposed layout: ``q_idx [1, BLOCK_M]``,
  ``kv_idx [BLOCK_N, 1]``, ``score [BLOCK_N, BLOCK_M]``; device functions must only broadcast),
  already wrapped into ``[0, Q_LEN)`` / ``[0, KV_LEN)`` so that gathers in the mod stay in bounds on
  tail tiles (the template masks the tail itself).
- ``*_ARGS``: an opaque tuple (pointers, sizes, strides of captured tensors) passed straight from
  ``KernelMod.args`` to the device function; kernels never look inside.
- ``dout``: fp32 ``[BLOCK_M, BLOCK_N]``, dLoss/d(modded score); zero wherever the position is masked
  or out of range. ``SCORE_GRAD_FN`` returns dLoss/d(score) and atomically accumulates
  dLoss/d(capture) into the fp32 buffers of ``SCORE_GRAD_ARGS`` (see ``KernelMod.grad_args``).
  With ``SCORE_GRAD_ARGS == ()`` it only returns dLoss/d(score) and writes nothing (the backward's
  dQ kernel relies on this: the dK/dV kernel alone accumulates the captured-tensor gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KernelMod:
    """One compiled mod, ready to be handed to a kernel launcher.

    Attributes:
        fn: the ``@triton.jit`` device function (signature in the module docstring).
        args: the runtime tuple for ``fn`` (captured tensors and their sizes/strides).
        grad_fn: score mods only: the ``@triton.jit`` gradient function, or None when the
            mod has no gradient path (mask mods).
        grad_captures: the captured tensors that require grad, in the order their gradient
            buffers are expected by ``grad_args``.
        make_grad_args: builds ``SCORE_GRAD_ARGS`` from fp32 gradient buffers, one per entry
            of ``grad_captures`` and of the same shape (contiguous).
        name: a readable name for logs and errors.
        trivial: the mod changes nothing (a score mod returning its score, a mask mod returning
            True); launchers may pick tiles tuned for the unmasked kernel.
        light: a score mod of a few cheap element-wise operations (no special functions, no
            learnable captures); launchers may cap the backward's registers for it.
        captures: every tensor the mod reads, in the order ``args`` holds them (``args`` is built
            from these; ``flexattn.compiler.bind_captures`` rebuilds it for other tensors).
        grad_slots: the indices into ``captures`` of ``grad_captures``.
        bias_fn: additive score mods only: the ``@triton.jit`` base-2 bias ``(b, h, q_idx, kv_idx,
            SCORE_ARGS) -> f * log2(e)`` the kernels fold into their exp2 argument, else None.
        tile_gathers: the mod reads a captured tensor at an index that varies along both tile axes
            (a relative-position table ``t[h, q_idx - kv_idx]``): one 64-bit address per score, so
            launchers pick smaller tiles (``kernels/tiles.py``).
        tile_grad_fn: score mods with diagonal gathers: ``TILE_GRAD_FN`` (module docstring), else None.
    """

    fn: Any
    args: tuple
    grad_fn: Any = None
    grad_captures: tuple[torch.Tensor, ...] = ()
    make_grad_args: Callable[[tuple[torch.Tensor, ...]], tuple] | None = None
    name: str = "mod"
    trivial: bool = False
    light: bool = False
    captures: tuple[torch.Tensor, ...] = ()
    grad_slots: tuple[int, ...] = ()
    bias_fn: Any = None
    tile_gathers: bool = False
    tile_grad_fn: Any = None

    def grad_args(self, grad_buffers: tuple[torch.Tensor, ...]) -> tuple:
        """The ``SCORE_GRAD_ARGS`` tuple for fp32 gradient buffers shaped like ``grad_captures``."""
        if self.make_grad_args is None:
            return ()
        return self.make_grad_args(grad_buffers)
