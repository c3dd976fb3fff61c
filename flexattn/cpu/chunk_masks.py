"""A chunk's mask as an additive float tensor (0 allowed, -inf not) and an additive score_mod's bias.

Built from the block classes, at block granularity first: FULL and PARTIAL blocks 0, EMPTY ones
(listed for some other b / h of the chunk) -inf, expanded to elements by a broadcast copy. The
mask_mod runs only on the columns of PARTIAL blocks, and only there is a boolean ``where`` taken
(on CPU, boolean selects cost ~8 ns an element, float adds and copies well under 1). The additive
bias of a ``score + f(b, h, q_idx, kv_idx)`` score_mod is ``f``, run from the compiler's graph of
``f`` on broadcast index grids (``cpu.mod_graph.bias_graph``; else ``vmap`` of the mod at score 0),
and the mask is added into it in place. Size-1 batch and head dimensions stay size 1 where nothing
depends on b or h, so a causal chunk's mask is (1, 1, rows, cols).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flexattn.cpu.chunks import EMPTY, PARTIAL, Chunk
from flexattn.cpu.mod_graph import GatherOutOfRange, ModValues, bias_graph
from flexattn.mod_eval import broadcast_grids, eval_bias, eval_mask_mod, index


class ChunkMasks:
    """Masks and biases of the chunks of one call.

    Args:
        mask_mod: the BlockMask's mask_mod (None: no block mask). bias_mod: an additive score_mod
            (``score + f``) whose ``f`` becomes the bias, or None.
        B, H: batch and query heads of the call. blocks: (Q_BLOCK, KV_BLOCK).
    """

    def __init__(self, mask_mod: Callable | None, bias_mod: Callable | None, B: int, H: int,
                 blocks: tuple[int, int], device: torch.device):  # fmt: skip
        self.mask_mod, self.bias_mod = mask_mod, bias_mod
        self.B, self.H, self.device = B, H, device
        self.q_block, self.kv_block = blocks
        self.bias_graph = None if bias_mod is None else bias_graph(bias_mod, device)

    def mask(self, chunk: Chunk, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``dtype`` (B or 1, H or 1, rows, cols): 0 where the mask allows, -inf elsewhere; None
        when every pair is allowed."""
        if chunk.classes is None:
            return None
        classes = chunk.classes  # (Bm, Hm, nqb, nkb)
        blocks = torch.zeros(classes.shape, dtype=dtype, device=classes.device).masked_fill_(
            classes == EMPTY, -math.inf
        )
        mask = self._expand(blocks, chunk)
        partial = (classes == PARTIAL).flatten(0, 2).any(dim=0)  # (nkb,)
        if not bool(partial.any()):
            return mask
        cols = self._columns_of(partial.nonzero().flatten(), chunk.cols)  # chunk columns in partial blocks
        if cols.numel() and int(cols[-1]) - int(cols[0]) + 1 == cols.numel():  # one run: a view, no gather
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
        q_idx = index(chunk.start, chunk.stop, self.device)
        kv_idx = chunk.kv_positions(self.device)[cols]
        allowed = _compact(eval_mask_mod(self.mask_mod, self.B, self.H, q_idx, kv_idx))
        sub = torch.where(allowed, 0.0, -math.inf).to(dtype)
        partial_classes = classes[..., partial] == PARTIAL
        if not bool(partial_classes.all()):  # FULL / EMPTY blocks of other (b, h) in these columns
            width = kv_idx.numel()
            sub = torch.where(self._expand(partial_classes, chunk, width), sub, mask[..., cols])
        shape = (*torch.broadcast_shapes(mask.shape[:2], sub.shape[:2]), *mask.shape[2:])
        if isinstance(cols, slice) and cols == slice(0, chunk.cols) and tuple(sub.shape) == tuple(shape):
            return sub  # every column evaluated
        mask = mask.expand(shape).clone() if tuple(shape) != tuple(mask.shape) else mask
        mask[..., cols] = sub
        return mask

    def bias(self, chunk: Chunk) -> tuple[torch.Tensor | None, bool]:
        """``(f, fresh)``: float32 (B or 1, H or 1, rows, cols) the additive score_mod's ``f`` (None
        without one) and whether it is a new tensor the caller may write over."""
        if self.bias_mod is None:
            return None, False
        q_idx = index(chunk.start, chunk.stop, self.device)
        kv_idx = chunk.kv_positions(self.device)
        if self.bias_graph is not None:
            grids = broadcast_grids(index(0, self.B, self.device), index(0, self.H, self.device), q_idx, kv_idx)
            try:
                f, fresh = ModValues(self.bias_graph, keep_for_backward=False).term(*grids)
            except GatherOutOfRange:  # vmap below raises eager's IndexError, in the mod's terms
                pass
            else:
                shape = torch.broadcast_shapes(f.shape, (1, 1, chunk.rows, chunk.cols))
                if f.dtype != torch.float32 or tuple(f.shape) != tuple(shape):
                    f, fresh = f.to(torch.float32).expand(shape), False
                return f, fresh
        f = eval_bias(self.bias_mod, self.B, self.H, q_idx, kv_idx)
        return _compact(f.to(torch.float32)), False

    def float_mask(self, chunk: Chunk, dtype: torch.dtype, want_empty: bool = True):
        """``(mask, empty)``: SDPA's float attn_mask (bias where allowed, -inf elsewhere) in ``dtype``
        and bool (B or 1, H or 1, rows) the rows with no allowed key (None if there are none known,
        or ``want_empty`` is False); ``(None, None)`` when nothing is masked or biased."""
        bias, fresh = self.bias(chunk)
        mask = self.mask(chunk, torch.float32 if bias is not None else dtype)
        if bias is None and mask is None:
            return None, None
        if bias is None:
            return mask, _empty_rows(mask, want_empty)
        if not bool(torch.isfinite(bias.sum())):  # -inf / NaN in the bias itself
            both = bias.to(dtype) if mask is None else apply_mask(bias, mask).to(dtype)
            return both, _empty_rows(both, want_empty)
        if mask is None:  # a finite bias hides nothing
            return bias.to(dtype), None
        # -inf exactly where the mask is: the empty rows from the (often head-free) mask
        if fresh and tuple(torch.broadcast_shapes(bias.shape, mask.shape)) == tuple(bias.shape):
            both = bias.add_(mask)  # (a fresh grid: no new allocation, no page faults)
        else:
            both = bias + mask
        return both.to(dtype), _empty_rows(mask, want_empty)

    def _expand(self, blocks: torch.Tensor, chunk: Chunk, cols: int | None = None) -> torch.Tensor:
        """Block values (Bm, Hm, nqb, nkb) -> element values (Bm, Hm, rows, cols) (a copy)."""
        Bm, Hm, nqb, nkb = blocks.shape
        qb, kvb = self.q_block, self.kv_block
        wide = (
            blocks[:, :, :, None, :, None]
            .expand(Bm, Hm, nqb, qb, nkb, kvb)
            .reshape(Bm, Hm, nqb * qb, nkb * kvb)
        )
        rows, cols = chunk.rows, chunk.cols if cols is None else cols
        return wide[:, :, :rows, :cols].contiguous()  # (reshape may return a stride-0 view)

    def _columns_of(self, local_blocks: torch.Tensor, cols: int) -> torch.Tensor:
        """int64 chunk columns of the given local kv blocks (ascending, below ``cols``)."""
        within = torch.arange(self.kv_block, device="cpu")
        columns = (local_blocks[:, None] * self.kv_block + within).flatten()
        return columns[columns < cols]


def apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` where ``mask`` is 0, -inf where it is -inf, whatever the scores hold there.

    A plain add (fast) when every score is finite; a select otherwise, so that +inf or NaN at a
    masked pair (a mod evaluated where the mask hides it) still gives -inf, as on every backend.
    """
    if bool(torch.isfinite(scores.sum())):
        return scores + mask
    return torch.where(mask == 0, scores, -math.inf)


def _empty_rows(mask: torch.Tensor, want: bool) -> torch.Tensor | None:
    """bool (..., rows): the rows of an additive mask with no finite entry (None if not ``want``)."""
    return mask.amax(dim=-1) == -math.inf if want else None


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its broadcast (stride 0) batch / head dimensions cut to size 1."""
    for dim in (0, 1):
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            t = t.narrow(dim, 0, 1)
    return t
