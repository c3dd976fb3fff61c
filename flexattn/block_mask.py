"""BlockMask: which (q block, kv block) tiles attention visits, and the mask_mod for the partial ones.

Same format and names as ``torch.nn.attention.flex_attention.BlockMask`` (see docs/architecture.md).
Build one with :func:`create_block_mask` from a mask_mod, or with :meth:`BlockMask.from_kv_blocks`
from explicit block lists::

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, B=None, H=None, Q_LEN=1000, KV_LEN=1000, device="cpu")
    print(mask)            # shape, sparsity and an ASCII picture
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from flexattn.block_mask_build import (
    classify_blocks,
    dense_mask,
    dense_to_ordered,
    draw_blocks,
    ordered_to_dense,
)
from flexattn.mask_mods import and_masks, noop_mask, or_masks, sliced_mask_mod_error
from flexattn.mod_eval import check_mod, required_positional_args

if TYPE_CHECKING:
    from flexattn.kernels.block_tables import BlockTables

__all__ = [
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "check_attention_block_size",
    "noop_block_mask",
    "noop_mask",
    "or_masks",
    "sliced_mask_mod_error",
]

DEFAULT_BLOCK_SIZE = 128
KERNEL_BLOCK_MULTIPLE = 16  # attention needs blocks in multiples of this (check_attention_block_size)


def _block_size_pair(BLOCK_SIZE: int | tuple[int, int]) -> tuple[int, int]:
    pair = (BLOCK_SIZE, BLOCK_SIZE) if not isinstance(BLOCK_SIZE, tuple | list) else tuple(BLOCK_SIZE)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair):
        raise ValueError(
            "BLOCK_SIZE must be a positive int or a (Q_BLOCK, KV_BLOCK) pair of positive ints "
            f"(multiples of {KERNEL_BLOCK_MULTIPLE} for attention), got {BLOCK_SIZE!r}"
            f"{f' ({type(BLOCK_SIZE).__name__})' if not isinstance(BLOCK_SIZE, tuple | list) else ''}. "
            "Pass e.g. BLOCK_SIZE=128 or BLOCK_SIZE=(128, 64)."
        )
    return pair


def check_attention_block_size(BLOCK_SIZE: tuple[int, int]) -> None:
    """The one rule for a mask used in attention, on every backend: blocks are multiples of 16.

    (The Triton kernels visit a sparse block as whole tiles of at least 16 x 16; the reference
    backend refuses the same masks so that a mask means the same thing everywhere.)
    """
    for name, block in zip(("Q_BLOCK", "KV_BLOCK"), BLOCK_SIZE):
        if block % KERNEL_BLOCK_MULTIPLE:
            raise ValueError(
                f"block_mask has BLOCK_SIZE={tuple(BLOCK_SIZE)}: {name}={block} is not a multiple of "
                f"{KERNEL_BLOCK_MULTIPLE}, which attention needs on every backend (the kernels visit a "
                f"block as whole tiles of at least {KERNEL_BLOCK_MULTIPLE}). Rebuild the mask with "
                f"create_block_mask(..., BLOCK_SIZE=...) in multiples of {KERNEL_BLOCK_MULTIPLE}, e.g. 128."
            )


def _listed(name: str, q_side: bool) -> property:
    """PyTorch's BlockMask attribute ``name``, read from the mask's BlockTables (a q-side one is built
    on first use, see :meth:`BlockMask.tables`). Setting a kv-side table drops a q side derived from
    the old lists (it is derived again when next needed)."""

    def get(self: BlockMask):
        return getattr(self.tables(q_side=q_side), name)

    def put(self: BlockMask, value) -> None:
        held = self.block_tables if q_side else self.block_tables.kv_side_only()
        self.block_tables = replace(held, **{name: value})

    lazy = " (built on first use and kept)" if q_side else ""
    return property(get, put, doc=f"``BlockTables.{name}`` of this mask{lazy}; see BlockTables for shapes.")


@dataclass(eq=False, init=False)  # identity semantics: tensor fields have no boolean ==
class BlockMask:
    """Block-sparse description of an attention mask (fields as in PyTorch; see docs/architecture.md).

    The block lists live in ``block_tables`` (``kernels.block_tables.BlockTables``, where the list
    of tables is defined); PyTorch's names read them as properties. Shapes (B and H may be 1,
    meaning broadcast; NQ = ceil(Q_LEN / Q_BLOCK), NKV = ceil(KV_LEN / KV_BLOCK)):
        kv_num_blocks int32 (B, H, NQ), kv_indices int32 (B, H, NQ, NKV): partial blocks per q block.
        full_kv_num_blocks, full_kv_indices: the same for full blocks (mask_mod skipped), or None.
        q_num_blocks int32 (B, H, NKV), q_indices int32 (B, H, NKV, NQ): transposed partial view.
        full_q_num_blocks, full_q_indices: transposed full view, or None.
    The first ``num`` entries of each indices row are valid and sorted ascending.

    The transposed (q-side) view is needed only by the backward: :func:`create_block_mask` builds
    the kv side alone, and the q side is derived from it the first time anything reads it (the
    backward, a q-side attribute, :meth:`as_tuple`, ``tables()``), then kept on the mask. At 1M
    tokens with 128 x 128 blocks each int32 (NQ, NKV) table is 256 MiB: inference never pays for
    the q side.
    """

    seq_lengths: tuple[int, int]
    block_tables: BlockTables  # as held: the q side is None until first needed (read it via tables())
    mask_mod: Callable = noop_mask

    def __init__(self, seq_lengths: tuple[int, int], *args, **kwargs) -> None:
        """``BlockMask(seq_lengths, block_tables, mask_mod=noop_mask)``, or PyTorch's constructor
        ``BlockMask(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, BLOCK_SIZE=(128, 128),
        mask_mod=noop_mask)`` (drop-in). PyTorch's optional backward-order hints (keywords such as
        ``dq_write_order``) are accepted and not used: flexattn's kernels schedule their own backward."""
        from flexattn.kernels.block_tables import BlockTables  # the kernels' types load on first use

        if (args and isinstance(args[0], BlockTables)) or "block_tables" in kwargs:
            bound = _OWN_SIGNATURE.bind(seq_lengths, *args, **kwargs)
            bound.apply_defaults()
            tables, mask_mod = bound.arguments["block_tables"], bound.arguments["mask_mod"]
        else:
            bound = _PYTORCH_SIGNATURE.bind(seq_lengths, *args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            q_block, kv_block = _block_size_pair(given["BLOCK_SIZE"])
            lists = {name: given[name] for name in BlockTables.TENSORS}
            tables, mask_mod = BlockTables(**lists, q_block=q_block, kv_block=kv_block), given["mask_mod"]
        self.seq_lengths = tuple(seq_lengths)
        self.block_tables = tables
        self.mask_mod = noop_mask if mask_mod is None else mask_mod

    kv_num_blocks = _listed("kv_num_blocks", q_side=False)
    kv_indices = _listed("kv_indices", q_side=False)
    full_kv_num_blocks = _listed("full_kv_num_blocks", q_side=False)
    full_kv_indices = _listed("full_kv_indices", q_side=False)
    q_num_blocks = _listed("q_num_blocks", q_side=True)
    q_indices = _listed("q_indices", q_side=True)
    full_q_num_blocks = _listed("full_q_num_blocks", q_side=True)
    full_q_indices = _listed("full_q_indices", q_side=True)

    @property
    def BLOCK_SIZE(self) -> tuple[int, int]:  # noqa: N802 (PyTorch's name)
        """(Q_BLOCK, KV_BLOCK)."""
        return (self.block_tables.q_block, self.block_tables.kv_block)

    @BLOCK_SIZE.setter
    def BLOCK_SIZE(self, value: tuple[int, int]) -> None:  # noqa: N802
        q_block, kv_block = value
        self.block_tables = replace(self.block_tables, q_block=q_block, kv_block=kv_block)

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
    ) -> BlockMask:
        """A BlockMask from kv-side block lists; derives the transposed q-side lists.

        Tensors with fewer than 4 dims get leading size-1 (broadcast) dims. ``seq_lengths``
        defaults to (NQ * Q_BLOCK, NKV * KV_BLOCK); ``mask_mod`` to :func:`noop_mask`.
        ``compute_q_blocks=False`` leaves the q side to be derived on first use (PyTorch leaves it
        None; flexattn builds it when something reads it).

        Example:
            >>> num = torch.tensor([[[1, 2]]], dtype=torch.int32)             # (B=1, H=1, NQ=2)
            >>> idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)   # (1, 1, 2, NKV=2)
            >>> BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16).to_dense()[0, 0].tolist()
            [[1, 0], [1, 1]]
        """
        from flexattn.kernels.block_tables import BlockTables  # the kernels' types load on first use

        if kv_indices.dim() < 2 or kv_num_blocks.dim() != kv_indices.dim() - 1:
            raise ValueError(
                f"kv_indices must be (..., NQ, NKV) and kv_num_blocks (..., NQ); got shapes "
                f"{tuple(kv_indices.shape)} and {tuple(kv_num_blocks.shape)}."
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("Pass both full_kv_num_blocks and full_kv_indices, or neither.")

        kv_num_blocks, kv_indices = _to_4d(kv_num_blocks, 3), _to_4d(kv_indices, 4)
        full_kv_num_blocks, full_kv_indices = _to_4d(full_kv_num_blocks, 3), _to_4d(full_kv_indices, 4)
        q_block, kv_block = _block_size_pair(BLOCK_SIZE)
        if mask_mod is None:
            mask_mod = noop_mask
        check_mod(mask_mod, "mask_mod", "mask_mod")
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * q_block, kv_indices.shape[-1] * kv_block)
        lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, None, None, None, None)
        mask = cls(tuple(seq_lengths), BlockTables(*lists, q_block, kv_block), mask_mod)
        if compute_q_blocks:
            mask.tables()
        return mask

    @classmethod
    def from_pytorch(cls, mask) -> BlockMask:
        """The flexattn BlockMask of a ``torch.nn.attention.flex_attention.BlockMask`` (same tensors)."""
        from flexattn.kernels.block_tables import BlockTables

        names = ("seq_lengths", "BLOCK_SIZE", "mask_mod", *BlockTables.TENSORS)
        missing = [name for name in names if not hasattr(mask, name)]
        if missing:
            raise TypeError(
                f"block_mask ({type(mask).__name__}) lacks the BlockMask fields {missing}: pass a "
                "flexattn.BlockMask (from create_block_mask) or PyTorch's BlockMask."
            )
        lists = {name: getattr(mask, name) for name in BlockTables.TENSORS}
        return cls(mask.seq_lengths, **lists, BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask.mask_mod)

    def tables(self, q_side: bool = True) -> BlockTables:
        """The block lists as the kernels read them (``kernels.block_tables.BlockTables``).

        ``q_side=True`` (the default, and what every reader of the transposed view goes through):
        derive the q side if it is missing (``block_mask_build.complete_q_side``: a kernel on CUDA,
        no host sync) and keep it on the mask, so it is built once. Not kept while a CUDA graph is
        being captured (tensors made then hold values only in replays). ``q_side=False``: the tables
        as held (the forward's view; the q side may be None).
        """
        held = self.block_tables
        if not q_side or held.has_q_side:
            return held
        from flexattn.block_mask_build import complete_q_side

        done = complete_q_side(held)
        device = held.kv_indices.device
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.block_tables = done
        return done

    # ---- shape and statistics -------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN) of the mask (B, H may be 1: broadcast)."""
        return tuple(self.kv_indices.shape[:-2]) + tuple(self.seq_lengths)

    def numel(self) -> int:
        """Number of (b, h, q, kv) elements the mask describes, ignoring sparsity."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def sparsity(self) -> float:
        """Percentage of the (b, h, q, kv) area lying in blocks that are never visited.

        Counts only in-range positions of tail blocks (so it stays within 0..100 for any length).
        """
        q_len, kv_len = self.seq_lengths
        (q_block, kv_block), device = self.BLOCK_SIZE, self.kv_indices.device
        nq, nkv = self.kv_indices.shape[-2:]
        rows = (q_len - torch.arange(nq, device=device) * q_block).clamp(0, q_block)  # rows per q block
        cols = (kv_len - torch.arange(nkv, device=device) * kv_block).clamp(0, kv_block)
        visited = (self._dense_blocks() * rows[:, None] * cols[None, :]).sum().item()
        return 100.0 * (1.0 - visited / max(1, self.numel()))

    def to_dense(self) -> torch.Tensor:
        """int32 (B, H, NQ, NKV): 1 where a block is visited (partial or full), else 0."""
        return self._dense_blocks().to(torch.int32)

    def _dense_blocks(self, full: bool | None = None) -> torch.Tensor:
        """bool (B, H, NQ, NKV) of the partial blocks (full=False), full ones (True) or both (None)."""
        nkv = self.kv_indices.shape[-1]
        partial = ordered_to_dense(self.kv_num_blocks, self.kv_indices, nkv)
        if self.full_kv_num_blocks is None:
            full_dense = torch.zeros_like(partial)
        else:
            full_dense = ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, nkv)
        if full is None:
            return partial | full_dense
        return full_dense if full else partial

    # ---- pictures ----------------------------------------------------------------------------------

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """ASCII picture per (b, h): '█' full block, '░' partial, ' ' never visited.

        Larger masks are downsampled to ``grid_size`` cells (-1: one cell per block); a cell shows
        '█' if all its blocks are full, ' ' if all are empty, '░' otherwise. At most ``limit``
        (b, h) pictures are drawn.
        """
        return draw_blocks(self._dense_blocks(full=True), self._dense_blocks(), grid_size, limit)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%,\n{self.to_string()}\n)"

    def __repr__(self) -> str:
        held = self.block_tables

        def shape_of(name, t):
            if t is None and name in held.Q_SIDE and not held.has_q_side:
                return "not built yet (derived on first use)"
            return None if t is None else tuple(t.shape)

        body = "".join(f"    {n}={shape_of(n, t)},\n" for n, t in zip(held.TENSORS, held.tensors()))
        mod = getattr(self.mask_mod, "__name__", self.mask_mod)
        return (
            f"BlockMask(\n{body}    BLOCK_SIZE={self.BLOCK_SIZE},\n    shape={self.shape},\n"
            f"    sparsity={self.sparsity():.2f}%,\n    mask_mod={mod}\n)"
        )

    # ---- derived masks -------------------------------------------------------------------------

    def __getitem__(self, index) -> BlockMask:
        """Select batches, heads and q blocks: ``mask[b]``, ``mask[:, h]``, ``mask[:, :, q_blocks]``.

        All four dims are kept (an int index keeps a size-1 dim). The slice's mask_mod is reset to
        a stub that raises until you set one matching the slice's b / h / q_idx (as in PyTorch).
        Selecting q blocks sets Q_LEN to (selected blocks) * Q_BLOCK.
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(
                f"A BlockMask is indexed by at most (batch, head, q_block), got {len(index)} indices."
            )
        index = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape
        index = tuple(slice(i % n, i % n + 1) if isinstance(i, int) else i for i, n in zip(index, sizes))
        full_num = full_idx = None
        if self.full_kv_num_blocks is not None:
            full_num, full_idx = self.full_kv_num_blocks[index], self.full_kv_indices[index]
        kv_num, kv_idx = self.kv_num_blocks[index], self.kv_indices[index]
        q_len = self.seq_lengths[0]
        if kv_num.shape[2] != sizes[2]:
            q_len = kv_num.shape[2] * self.BLOCK_SIZE[0]
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=sliced_mask_mod_error,
            seq_lengths=(q_len, self.seq_lengths[1]),
            compute_q_blocks=False,
        )

    def to(self, device: torch.device | str) -> BlockMask:
        """A copy with every tensor it holds on ``device`` (a q side not built yet stays to be built)."""
        return replace(self, block_tables=self.block_tables.to(device))

    # ---- PyTorch interoperability ---------------------------------------------------------------

    # PyTorch's BlockMask (2.12+) also carries precomputed dQ write orders; flexattn never builds
    # them, so they read as None and a mask passed to PyTorch's flex_attention goes without them.
    dq_write_order = dq_write_order_full = dq_kv_order = dq_kv_order_spt = None

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields as a positional tuple, in the order of PyTorch's ``BlockMask.as_tuple``.

        This is how PyTorch's own ``flex_attention`` reads a mask, so a flexattn BlockMask can be
        passed to it. ``flatten=True`` spreads ``seq_lengths`` and ``BLOCK_SIZE`` into two ints each:
        ``(Q_LEN, KV_LEN, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, *extra, Q_BLOCK, KV_BLOCK,
        mask_mod)``, where ``extra`` are the fields the installed PyTorch's BlockMask has beyond these
        (``dq_write_order, dq_write_order_full, dq_kv_order, dq_kv_order_spt`` since torch 2.12; all
        None here). Inside flexattn, use the named fields. Builds the q side if it is missing
        (PyTorch's flex_attention needs it for a backward).
        """
        seq_lengths = tuple(self.seq_lengths) if flatten else (tuple(self.seq_lengths),)
        block_size = tuple(self.BLOCK_SIZE) if flatten else (tuple(self.BLOCK_SIZE),)
        return (
            *seq_lengths,
            *self.tables().tensors(),
            *(getattr(self, name, None) for name in _pytorch_extra_fields()),
            *block_size,
            self.mask_mod,
        )

    def _adjust(self, new_q_len: int, new_kv_len: int) -> BlockMask:
        """The same mask cropped to shorter lengths (the top-left corner), e.g. for a shorter prompt.

        Only valid for mask_mods whose pattern does not depend on the total length. Growing a mask
        needs a new ``create_block_mask``.
        """
        num_q_blocks, num_kv_blocks = self.kv_indices.shape[-2:]
        checks = (
            ("new_q_len", new_q_len, self.seq_lengths[0], self.BLOCK_SIZE[0], num_q_blocks, "q"),
            ("new_kv_len", new_kv_len, self.seq_lengths[1], self.BLOCK_SIZE[1], num_kv_blocks, "kv"),
        )
        for name, new_len, old_len, block, num_blocks, side in checks:
            if new_len > old_len and -(-new_len // block) > num_blocks:
                raise ValueError(
                    f"_adjust can only shrink a BlockMask: {name}={new_len} needs more {side} blocks than "
                    f"the mask's {num_blocks}. Build a new mask with create_block_mask."
                )
        nq = -(-new_q_len // self.BLOCK_SIZE[0])
        nkv = -(-new_kv_len // self.BLOCK_SIZE[1])

        def crop(num, idx):
            if num is None:
                return None, None
            num, idx = num[:, :, :nq], idx[:, :, :nq]
            slot = torch.arange(idx.shape[-1], device=idx.device)
            # Valid entries are sorted ascending, so those still in range are a prefix.
            num = ((slot < num.unsqueeze(-1)) & (idx < nkv)).sum(-1, dtype=torch.int32)
            return num.contiguous(), idx[..., :nkv].contiguous()

        kv_num, kv_idx = crop(self.kv_num_blocks, self.kv_indices)
        full_num, full_idx = crop(self.full_kv_num_blocks, self.full_kv_indices)
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=self.mask_mod,
            seq_lengths=(new_q_len, new_kv_len),
            compute_q_blocks=False,
        )


def _to_4d(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() > dims:
        raise ValueError(f"BlockMask tensors have at most {dims} dims here, got shape {tuple(t.shape)}.")
    return t.reshape((1,) * (dims - t.dim()) + tuple(t.shape)).to(torch.int32).contiguous()


def _check_size(name: str, value, allow_none: bool) -> int:
    if value is None and allow_none:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or None (broadcast)" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}.")
    return value


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    *,
    backend: str = "auto",
) -> BlockMask:
    """Build a BlockMask from ``mask_mod(b, h, q_idx, kv_idx)``.

    Args:
        mask_mod: per-element mask (int32 0-dim indices -> bool), as for PyTorch.
        B, H: batch size and number of query heads; None builds a mask broadcast over that dim.
        Q_LEN, KV_LEN: sequence lengths.
        device: where to build and keep the mask (default: CUDA if available, else CPU).
        BLOCK_SIZE: int or (Q_BLOCK, KV_BLOCK).
        _compile: accepted for compatibility with PyTorch; ignored.
        separate_full_blocks: list blocks where every pair is allowed as *full* (mask_mod skipped).
        backend: "auto" (default): on CUDA a kernel generated from the mask mod decides most blocks
            from their index ranges and evaluates only the rest element by element (no L x L pass, no
            host sync); on CPU, and for mods the compiler cannot trace, the chunked torch evaluation.
            "triton" forces the kernel (on CPU through Triton's interpreter: needs TRITON_INTERPRET=1),
            "torch" the chunked evaluation. Both give the same blocks (see block_mask_device).
    Returns:
        BlockMask with tensors (B or 1, H or 1, NQ, NKV). Positions past Q_LEN / KV_LEN in a tail
        block are ignored when classifying (see block_mask_build), so such blocks may be full.
        Only the kv side is built here; the transposed view the backward needs is derived on first
        use (see BlockMask), so inference holds two (NQ, NKV) int32 tables, not four.

    Example:
        >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        >>> mask = create_block_mask(causal, None, None, 300, 300, device="cpu", BLOCK_SIZE=128)
        >>> mask.to_dense()[0, 0].tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    check_mod(mask_mod, "mask_mod", "mask_mod")
    B, H = _check_size("B", B, True), _check_size("H", H, True)
    Q_LEN, KV_LEN = _check_size("Q_LEN", Q_LEN, False), _check_size("KV_LEN", KV_LEN, False)
    q_block, kv_block = _block_size_pair(BLOCK_SIZE)
    device = _default_device(device)
    # the compiler and the device builder load on first use (``import flexattn`` stays light)
    from flexattn.block_mask_device import build_tables, choose_builder
    from flexattn.compiler.checks import check_mod as check_traced

    check_traced(mask_mod, "mask", (B, H, Q_LEN, KV_LEN), device)  # the kernels' refusals, here too
    choice = choose_builder(mask_mod, device, backend, q_block, kv_block)
    if choice.builder == "triton":
        tables = build_tables(choice, B, H, Q_LEN, KV_LEN, q_block, kv_block, device, separate_full_blocks)
        return BlockMask((Q_LEN, KV_LEN), tables, mask_mod)
    partial, full = classify_blocks(mask_mod, B, H, Q_LEN, KV_LEN, q_block, kv_block, device)
    if not separate_full_blocks:
        partial, full = partial | full, None
    kv_num, kv_idx = dense_to_ordered(partial)
    full_num, full_idx = (None, None) if full is None else dense_to_ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod,
        seq_lengths=(Q_LEN, KV_LEN),
        compute_q_blocks=False,
    )


def create_mask(
    mod_fn: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense bool mask (B or 1, H or 1, Q_LEN, KV_LEN) from a mask_mod or a score_mod.

    For a score_mod (5 arguments) the mask is True where the mod leaves a zero score finite, as in
    PyTorch. Memory is O(B*H*Q_LEN*KV_LEN): use it for small sizes, tests and pictures.

    Example:
        >>> create_mask(lambda b, h, q, kv: q >= kv, 1, 1, 2, 2, device="cpu")[0, 0].tolist()
        [[True, False], [True, True]]
    """
    if not callable(mod_fn):
        raise TypeError(f"mod_fn must be a mask_mod or score_mod callable, got {type(mod_fn).__name__}.")
    is_score_mod = _arity(mod_fn) == 5
    check_mod(mod_fn, "mod_fn", "score_mod" if is_score_mod else "mask_mod")
    B, H = _check_size("B", B, True), _check_size("H", H, True)
    Q_LEN, KV_LEN = _check_size("Q_LEN", Q_LEN, False), _check_size("KV_LEN", KV_LEN, False)
    device = _default_device(device)
    from flexattn.compiler.checks import check_mod as check_traced  # loads on first use

    check_traced(mod_fn, "score" if is_score_mod else "mask", (B, H, Q_LEN, KV_LEN), device)
    return dense_mask(mod_fn, is_score_mod, B, H, Q_LEN, KV_LEN, device)


def _arity(fn: Callable) -> int | None:
    try:
        return required_positional_args(fn)
    except (TypeError, ValueError):
        return None


def noop_block_mask(
    q_len: int, kv_len: int, device: torch.device | str, BLOCK_SIZE: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """The mask flex_attention uses when none is given: every block full, nothing evaluated."""
    nq, nkv = -(-q_len // BLOCK_SIZE), -(-kv_len // BLOCK_SIZE)
    zeros_q = torch.zeros(1, 1, nq, dtype=torch.int32, device=device)
    zeros_kv = torch.zeros(1, 1, nkv, dtype=torch.int32, device=device)
    kv_idx = torch.arange(nkv, dtype=torch.int32, device=device).expand(1, 1, nq, nkv).contiguous()
    q_idx = torch.arange(nq, dtype=torch.int32, device=device).expand(1, 1, nkv, nq).contiguous()
    from flexattn.kernels.block_tables import BlockTables

    full_kv, full_q = torch.full_like(zeros_q, nkv), torch.full_like(zeros_kv, nq)
    lists = (zeros_q, kv_idx, full_kv, kv_idx, zeros_kv, q_idx, full_q, q_idx)
    return BlockMask((q_len, kv_len), BlockTables(*lists, BLOCK_SIZE, BLOCK_SIZE), noop_mask)


@functools.cache
def _own_form(seq_lengths, block_tables, mask_mod=noop_mask):  # BlockMask's own fields
    pass


def _pytorch_form(
    seq_lengths,
    kv_num_blocks,
    kv_indices,
    full_kv_num_blocks=None,
    full_kv_indices=None,
    q_num_blocks=None,
    q_indices=None,
    full_q_num_blocks=None,
    full_q_indices=None,
    BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
    mask_mod=noop_mask,
    **backward_hints,
):  # noqa: N803
    pass  # PyTorch's BlockMask.__init__ (its keyword-only backward hints land in backward_hints)


_OWN_SIGNATURE, _PYTORCH_SIGNATURE = inspect.signature(_own_form), inspect.signature(_pytorch_form)


def _pytorch_extra_fields() -> tuple[str, ...]:
    """The installed PyTorch BlockMask's constructor fields after ``mask_mod`` (as_tuple's layout)."""
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

    names = list(inspect.signature(TorchBlockMask.__init__).parameters)
    return tuple(names[names.index("mask_mod") + 1 :])
