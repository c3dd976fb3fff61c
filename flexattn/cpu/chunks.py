"""Which keys each group of query rows visits: the CPU fast path's work list, from the BlockMask.

A *chunk* is a run of consecutive query blocks that visit the same kv blocks (the union over b and
h), or up to CHUNK_ROWS rows of blocks that need a mask, over the union of their kv blocks. The
CPU engines attend each chunk to those keys only, so the empty part of a causal, sliding window
or document mask is never computed; and a chunk whose visited blocks are all *full* for
every (b, h) needs no mask at all (``Chunk.classes is None``), so noop chunks run SDPA unmasked.

Host code on CPU tensors: it reads the block tables freely (the CPU path never runs under
torch.compile; ``flexattn.cpu.choice`` sends traced calls to the reference backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.block_mask import BlockMask

# Elements of one chunk's (Bm, Hm, rows, cols) mask before a run of alike query blocks is cut.
MASK_ELEMENTS = 1 << 22
# Query rows per chunk when its blocks need a mask: runs of up to this many rows share one SDPA call
# over the union of their keys (the CPU flash kernel is faster on longer query runs).
CHUNK_ROWS = 512

EMPTY, PARTIAL, FULL = 0, 1, 2  # block classes


@dataclass(frozen=True)
class Chunk:
    """Query rows ``start:stop`` and the keys they visit.

    ``columns``: a slice of kv positions (the visited blocks are contiguous) or int64 positions
    (ascending). ``blocks``: int64 (nkb,) the visited kv block ids, ascending. ``classes``: int8
    (Bm, Hm, nqb, nkb) the class of each (q block, visited kv block) pair (EMPTY / PARTIAL / FULL),
    or None when every pair is FULL for every (b, h) (no mask needed).
    """

    start: int
    stop: int
    columns: slice | torch.Tensor
    blocks: torch.Tensor | None
    classes: torch.Tensor | None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def cols(self) -> int:
        c = self.columns
        return c.stop - c.start if isinstance(c, slice) else int(c.numel())

    def kv_positions(self, device) -> torch.Tensor:
        """int32 (cols,) the kv positions (what the mods see as ``kv_idx``)."""
        c = self.columns
        if isinstance(c, slice):
            return torch.arange(c.start, c.stop, dtype=torch.int32, device=device)
        return c.to(device=device, dtype=torch.int32)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, H, Lkv, E) restricted to the chunk's keys (a view for a slice, else a copy)."""
        c = self.columns
        return t[:, :, c] if isinstance(c, slice) else t.index_select(2, c)


def plan_chunks(
    block_mask: BlockMask | None,
    q_len: int,
    kv_len: int,
    mask_elements: int = MASK_ELEMENTS,
    rows: int = CHUNK_ROWS,
) -> list[Chunk]:
    """The chunks of a call with ``q_len`` query rows and ``kv_len`` keys (``block_mask`` for exactly
    these lengths, or None: one unmasked chunk).

    Example:
        >>> from flexattn import create_block_mask
        >>> m = create_block_mask(lambda b, h, i, j: i >= j, None, None, 1024, 1024, device="cpu")
        >>> [(c.start, c.stop, c.columns) for c in plan_chunks(m, 1024, 1024)]
        [(0, 512, slice(0, 512, None)), (512, 1024, slice(0, 1024, None))]
    """
    if block_mask is None:
        return [Chunk(0, q_len, slice(0, kv_len), None, None)]
    q_block, kv_block = block_mask.BLOCK_SIZE
    nq, nkv = -(-q_len // q_block), -(-kv_len // kv_block)
    full = block_mask._dense_blocks(full=True)[:, :, :nq, :nkv]
    partial = block_mask._dense_blocks(full=False)[:, :, :nq, :nkv]
    classes = full.to(torch.int8) * FULL + (partial & ~full).to(torch.int8) * PARTIAL  # (Bm, Hm, NQ, NKV)
    visited = (classes > 0).flatten(0, 1).any(dim=0)  # (NQ, NKV)
    masked = ((classes != FULL) & visited).flatten(0, 1).any(dim=0).any(dim=-1)  # (NQ,)
    per_elem = classes.shape[0] * classes.shape[1]
    keys = [bytes(row) for row in visited.to(torch.uint8).numpy()]
    masked = masked.tolist()
    chunks, first, union = [], 0, visited[0].clone()
    for i in range(1, nq + 1):
        if (
            i < nq
            and keys[i] == keys[first]
            and not masked[i]
            and not masked[first]
            and bool(union.equal(visited[i]))
        ):
            continue  # alike unmasked blocks: one unmasked call, however many rows
        if i < nq and (i + 1 - first) * q_block <= rows and (masked[i] or masked[first]):
            grown = union | visited[i]
            if (i + 1 - first) * q_block * int(grown.sum()) * kv_block * per_elem <= mask_elements:
                union = grown  # a few masked blocks together: longer SDPA calls, the union of their keys
                continue
        exact = bool((visited[first:i] == union).all())
        needs_mask = any(masked[first:i]) or not exact
        chunks.append(_chunk(first, i, union, classes, needs_mask, q_block, kv_block, q_len, kv_len))
        if i < nq:
            first, union = i, visited[i].clone()
    return chunks


def split_full(chunk: Chunk, kv_block: int, kv_len: int) -> list[Chunk]:
    """``chunk`` as [its kv blocks FULL for every row and (b, h), unmasked; the others, masked] when
    it has both kinds (a causal chunk: the blocks left of the diagonal, and the diagonal), else
    ``[chunk]``. The SDPA engine runs the parts separately and merges them by their LSE."""
    if chunk.classes is None:
        return [chunk]
    full = (chunk.classes == FULL).flatten(0, 2).all(dim=0)  # (nkb,)
    if not bool(full.any()) or bool(full.all()):
        return [chunk]
    parts = []
    for blocks, classes in ((chunk.blocks[full], None), (chunk.blocks[~full], chunk.classes[..., ~full])):
        parts.append(Chunk(chunk.start, chunk.stop, _columns(blocks, kv_block, kv_len), blocks, classes))
    return parts


def _columns(blocks: torch.Tensor, kv_block: int, kv_len: int) -> slice | torch.Tensor:
    """The kv positions of ``blocks`` (ascending int64 ids): a slice when they are contiguous."""
    lo, hi = int(blocks[0]), int(blocks[-1]) + 1
    if hi - lo == blocks.numel():  # contiguous: a view of the keys
        return slice(lo * kv_block, min(hi * kv_block, kv_len))
    within = torch.arange(kv_block, device=blocks.device).expand(blocks.numel(), kv_block)
    columns = (blocks[:, None] * kv_block + within).flatten()
    return columns[columns < kv_len]


def _chunk(qb0, qb1, visited, classes, masked, q_block, kv_block, q_len, kv_len) -> Chunk:
    """The chunk of q blocks ``qb0:qb1``, which all visit the kv blocks ``visited`` (bool (NKV,))."""
    start, stop = qb0 * q_block, min(qb1 * q_block, q_len)
    blocks = visited.nonzero().flatten()
    if blocks.numel() == 0:
        return Chunk(start, stop, slice(0, 0), blocks, None)
    columns = _columns(blocks, kv_block, kv_len)
    chunk_classes = classes[:, :, qb0:qb1][..., blocks] if masked else None
    return Chunk(start, stop, columns, blocks, chunk_classes)
