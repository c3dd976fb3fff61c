"""BlockTables: a block mask as the kernels read it (block lists and sizes, no mask_mod).

``flexattn.BlockMask`` is the user's object (it also holds the Python mask_mod, pictures, slicing);
the kernels take this typed view of its tensors, built once per call and passed down whole
(``BlockMask.tables()``). Each kv-side list says, per (b, h, q block), which kv blocks to visit;
each q-side list (the transposed view, used by the backward's dK/dV kernel) says, per
(b, h, kv block), which q blocks visit it. The first ``num[...]`` entries of an indices row are
valid and sorted ascending. B and H may be 1 (read with stride 0: broadcast).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockTables:
    """Block lists of one mask. Shapes: NQ = ceil(q_len / q_block), NKV = ceil(kv_len / kv_block).

    Attributes:
        kv_num_blocks int32 (B, H, NQ), kv_indices int32 (B, H, NQ, NKV): partial blocks (mask_mod
            evaluated element by element).
        full_kv_num_blocks, full_kv_indices: full blocks (mask_mod skipped), or None.
        q_num_blocks int32 (B, H, NKV), q_indices int32 (B, H, NKV, NQ): transposed partial view,
            or None until the backward needs it.
        full_q_num_blocks, full_q_indices: transposed full view, or None.
        q_block, kv_block: block sizes (rows of q, columns of kv per block).
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    q_num_blocks: torch.Tensor | None
    q_indices: torch.Tensor | None
    full_q_num_blocks: torch.Tensor | None
    full_q_indices: torch.Tensor | None
    q_block: int
    kv_block: int

    TENSORS = (
        "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
        "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
    )  # fmt: skip

    def tensors(self) -> list[torch.Tensor | None]:
        """The eight block-list tensors in ``TENSORS`` order (what crosses a torch.library op)."""
        return [getattr(self, name) for name in self.TENSORS]

    @classmethod
    def from_tensors(cls, tensors, q_block: int, kv_block: int) -> BlockTables:
        """The inverse of :meth:`tensors`."""
        return cls(**dict(zip(cls.TENSORS, tensors, strict=True)), q_block=q_block, kv_block=kv_block)

    @property
    def has_full(self) -> bool:
        return self.full_kv_num_blocks is not None

    @property
    def has_q_side(self) -> bool:
        return self.q_num_blocks is not None and (self.full_q_num_blocks is not None or not self.has_full)

    def with_q_side(self, q_num, q_idx, full_q_num, full_q_idx) -> BlockTables:
        """The same tables with the transposed view filled in."""
        return dataclasses.replace(
            self, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx
        )
