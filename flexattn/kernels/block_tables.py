"""BlockTables: a block mask as the kernels read it (block lists and sizes, no mask_mod).

``flexattn.BlockMask`` is the user's object (it also holds the Python mask_mod, pictures, slicing);
it keeps its block lists in one of these and reads PyTorch's field names from it, so the list of
tables is spelled once, here. The kernels take this typed view, built once per call and passed down
whole (``BlockMask.tables()``). Each kv-side list says, per (b, h, q block), which kv blocks to
visit; each q-side list (the transposed view, used by the backward's dK/dV kernel) says, per
(b, h, kv block), which q blocks visit it. The first ``num[...]`` entries of an indices row are
valid and sorted ascending. B and H may be 1 (read with stride 0: broadcast).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class BlockTables:
    """Block lists of one mask. Shapes: NQ = ceil(q_len / q_block), NKV = ceil(kv_len / kv_block).

    Attributes:
        kv_num_blocks int32 (B, H, NQ), kv_indices int32 (B, H, NQ, NKV): partial blocks (mask_mod
            evaluated element by element).
        full_kv_num_blocks, full_kv_indices: full blocks (mask_mod skipped), or None.
        q_num_blocks int32 (B, H, NKV), q_indices int32 (B, H, NKV, NQ): transposed partial view,
            or None until the backward needs it (``block_mask_build.complete_q_side`` derives it).
        full_q_num_blocks, full_q_indices: transposed full view, or None.
        q_block, kv_block: block sizes (rows of q, columns of kv per block).
    The eight tensor fields come first, in the order of PyTorch's BlockMask (``TENSORS``).
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

    TENSORS: ClassVar[tuple[str, ...]]  # the eight tensor fields in order (set below, from the fields)
    KV_SIDE: ClassVar[tuple[str, ...]]  # the first four: built with the mask
    Q_SIDE: ClassVar[tuple[str, ...]]  # the last four: the transposed view

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

    def kv_side_only(self) -> BlockTables:
        """The same tables without the transposed view."""
        return self.with_q_side(None, None, None, None)

    def to(self, device: torch.device | str) -> BlockTables:
        """A copy with every tensor on ``device``."""
        moved = {name: None if t is None else t.to(device) for name, t in zip(self.TENSORS, self.tensors())}
        return dataclasses.replace(self, **moved)

    def nbytes(self) -> int:
        """Bytes held by the tables (each distinct tensor counted once)."""
        distinct = {id(t): t for t in self.tensors() if t is not None}
        return sum(t.numel() * t.element_size() for t in distinct.values())


BlockTables.TENSORS = tuple(f.name for f in dataclasses.fields(BlockTables))[:8]
BlockTables.KV_SIDE, BlockTables.Q_SIDE = BlockTables.TENSORS[:4], BlockTables.TENSORS[4:]
