"""Building blocks of BlockMask construction: evaluating a mask_mod block by block, and converting
between dense block matrices and the (num_blocks, indices) "ordered" form the kernels read.

How ``classify_blocks`` stays fast and small: it evaluates the mask_mod (with vmap semantics) on
chunks of whole q blocks against every kv position (or against whole kv blocks, for very long
sequences or many heads), reduces each chunk to any/all per (q block, kv block) at once, and drops
it. Peak memory is one chunk (``budget`` elements), never B*H*Q_LEN*KV_LEN; a causal mask at
L=65536 (4.3e9 pairs) takes 1-2 s on one CPU core.

Tails: positions beyond Q_LEN / KV_LEN in the last block are never passed to the mask_mod (a mod
that gathers from a per-token table would read out of bounds) and are ignored when classifying: a
block is *full* when every in-range pair is allowed. Kernels mask the tail themselves, so a causal
mask keeps all its below-diagonal blocks full for any length. (PyTorch instead counts the padding as
masked, which makes every tail block partial; both give the same attention output.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flexattn.mod_eval import eval_mask_mod, eval_score_mod, index

if TYPE_CHECKING:
    from flexattn.kernels.block_tables import BlockTables

# Elements of mask_mod output evaluated at once (bool, so ~this many bytes plus the mod's temporaries).
DEFAULT_BUDGET = 1 << 22


def dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block matrix -> ordered form.

    Args:
        dense: bool or 0/1 tensor (..., R, C): which columns each row visits.
    Returns:
        num: int32 (..., R), number of visited columns per row.
        indices: int32 (..., R, C), the visited columns ascending first, then the others.
    """
    dense = dense.bool()
    num = dense.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not visited" (0 first) lists the visited columns first, in ascending order.
    indices = torch.sort(dense.logical_not().to(torch.uint8), dim=-1, stable=True).indices
    return num.contiguous(), indices.to(torch.int32).contiguous()


def ordered_to_dense(num: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Ordered form -> bool block matrix (..., R, num_cols); entries past ``num`` are ignored."""
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = slot < num.unsqueeze(-1)
    target = torch.where(valid, indices.long(), num_cols)  # invalid entries land in a spill column
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_cols]


def transpose_ordered(num: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) -> (q_num_blocks, q_indices): for each column, the rows visiting it."""
    dense = ordered_to_dense(num, indices, indices.shape[-1])
    return dense_to_ordered(dense.transpose(-2, -1))


Q_SIDE_BUILDERS = ("auto", "triton", "torch")


def complete_q_side(tables: BlockTables, builder: str = "auto") -> BlockTables:
    """``tables`` with the transposed (q-side) view derived from the kv side where it is missing.

    ``builder``: "auto" runs the device kernel (``kernels.block_mask_kernel.build_q_side``: O(blocks)
    memory, no host sync) on CUDA tensors and :func:`transpose_ordered` elsewhere; "triton" forces the
    kernel (on CPU through Triton's interpreter, for tests), "torch" the torch ops. Same result.
    ``BlockMask.tables()`` calls this once and keeps the result on the mask.
    """
    if builder not in Q_SIDE_BUILDERS:
        raise ValueError(f"builder must be one of {Q_SIDE_BUILDERS}, got {builder!r}.")
    if tables.has_q_side:
        return tables
    if builder == "triton" or (builder == "auto" and tables.kv_indices.device.type == "cuda"):
        from flexattn.kernels.block_mask_kernel import build_q_side  # Triton loads on first use

        return build_q_side(tables)
    q_num, q_idx = transpose_ordered(tables.kv_num_blocks, tables.kv_indices)
    full_q_num = full_q_idx = None
    if tables.has_full:
        full_q_num, full_q_idx = transpose_ordered(tables.full_kv_num_blocks, tables.full_kv_indices)
    return tables.with_q_side(q_num, q_idx, full_q_num, full_q_idx)


def _reduce_rows(vals: torch.Tensor, q_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, c, N) uint8 0/1, c rows from a q-block boundary -> max/min per q block: (B, H, nb, N)."""
    c = vals.shape[2]
    whole = c // q_block
    maxes, mins = [], []
    if whole:
        blocks = vals[:, :, : whole * q_block].unflatten(2, (whole, q_block))
        maxes.append(blocks.amax(dim=3))
        mins.append(blocks.amin(dim=3))
    if c % q_block:
        tail = vals[:, :, whole * q_block :]
        maxes.append(tail.amax(dim=2, keepdim=True))
        mins.append(tail.amin(dim=2, keepdim=True))
    return torch.cat(maxes, dim=2), torch.cat(mins, dim=2)


def _reduce_cols(maxes: torch.Tensor, mins: torch.Tensor, kv_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nb, N) per-position max/min -> per kv block: (B, H, nb, ceil(N / kv_block))."""
    n = maxes.shape[-1]
    whole = n // kv_block
    out_max, out_min = [], []
    if whole:
        out_max.append(maxes[..., : whole * kv_block].unflatten(-1, (whole, kv_block)).amax(dim=-1))
        out_min.append(mins[..., : whole * kv_block].unflatten(-1, (whole, kv_block)).amin(dim=-1))
    if n % kv_block:
        out_max.append(maxes[..., whole * kv_block :].amax(dim=-1, keepdim=True))
        out_min.append(mins[..., whole * kv_block :].amin(dim=-1, keepdim=True))
    return torch.cat(out_max, dim=-1), torch.cat(out_min, dim=-1)


def classify_blocks(
    mask_mod: Callable,
    B: int,
    H: int,
    q_len: int,
    kv_len: int,
    q_block: int,
    kv_block: int,
    device: torch.device | str,
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify every (b, h, q block, kv block).

    Returns:
        partial: bool (B, H, NQ, NKV), some but not all in-range pairs allowed.
        full: bool (B, H, NQ, NKV), every in-range pair allowed.
        (Neither: the block is empty and never visited.)
    """
    nq = -(-q_len // q_block)
    nkv = -(-kv_len // kv_block)
    any_blocks = torch.empty(B, H, nq, nkv, dtype=torch.bool, device=device)
    all_blocks = torch.empty_like(any_blocks)
    for b, h in _batch_head_groups(B, H, q_block * kv_len, budget, device):
        per_row = b.numel() * h.numel()
        # One q block against as many whole kv blocks as fit the budget (all of them, usually) ...
        cols = max(1, budget // (per_row * q_block) // kv_block) * kv_block
        # ... and, when all kv positions fit, as many whole q blocks as fit.
        rows = max(1, budget // (per_row * kv_len) // q_block) * q_block if cols >= kv_len else q_block
        for q_start in range(0, q_len, rows):
            q = index(q_start, min(q_start + rows, q_len), device)
            for kv_start in range(0, kv_len, cols):
                kv = index(kv_start, min(kv_start + cols, kv_len), device)
                vals = eval_mask_mod(mask_mod, b, h, q, kv)  # (nb, nh, rows, cols)
                # any/all as max/min over uint8: much faster than bool any/all over a middle dim.
                row_max, row_min = _reduce_rows(vals.view(torch.uint8), q_block)
                blk_max, blk_min = _reduce_cols(row_max, row_min, kv_block)
                q_blocks = slice(q_start // q_block, q_start // q_block + blk_max.shape[2])
                kv_blocks = slice(kv_start // kv_block, kv_start // kv_block + blk_max.shape[3])
                any_blocks[b[:, None], h[None, :], q_blocks, kv_blocks] = blk_max.bool()
                all_blocks[b[:, None], h[None, :], q_blocks, kv_blocks] = blk_min.bool()
    return any_blocks & ~all_blocks, all_blocks


def _batch_head_groups(
    B: int, H: int, per_bh: int, budget: int, device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(b, h) index groups to evaluate together: all at once, per batch, or per (batch, head),
    whichever first keeps one q block's worth of pairs (``per_bh`` per (b, h)) within ``budget``."""
    if B * H * per_bh <= budget:
        return [(index(0, B, device), index(0, H, device))]
    if H * per_bh <= budget:
        return [(index(b, b + 1, device), index(0, H, device)) for b in range(B)]
    return [(index(b, b + 1, device), index(h, h + 1, device)) for b in range(B) for h in range(H)]


def dense_mask(
    mod_fn: Callable,
    is_score_mod: bool,
    B: int,
    H: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """Element-level bool mask (B, H, q_len, kv_len), evaluated in q-row chunks.

    For a score_mod, True where it leaves a zero score finite (not -inf), as PyTorch's create_mask.
    """
    out = torch.empty(B, H, q_len, kv_len, dtype=torch.bool, device=device)
    rows = max(1, budget // max(1, B * H * kv_len))
    kv = index(0, kv_len, device)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        q = index(start, stop, device)
        if is_score_mod:
            zeros = torch.zeros(B, H, stop - start, kv_len, device=device)
            out[:, :, start:stop] = ~torch.isneginf(eval_score_mod(mod_fn, zeros, q, kv))
        else:
            out[:, :, start:stop] = eval_mask_mod(mod_fn, B, H, q, kv)
    return out


def draw_blocks(
    full: torch.Tensor, visited: torch.Tensor, grid_size: int | tuple[int, int], limit: int
) -> str:
    """ASCII pictures of (B, H, NQ, NKV) block matrices; see ``BlockMask.to_string``."""
    *batch, rows, cols = visited.shape
    if grid_size == -1:
        max_rows, max_cols = rows, cols
    elif isinstance(grid_size, int):
        max_rows = max_cols = grid_size
    else:
        max_rows, max_cols = grid_size
    row_step, col_step = max(1, -(-rows // max_rows)), max(1, -(-cols // max_cols))
    pictures = []
    for n, (b, h) in enumerate(itertools.product(*(range(d) for d in batch))):
        if n == limit:
            more = batch[0] * batch[1] - limit
            pictures.append(f"... ({more} more; to_string(limit=N) or index mask[b, h])")
            break
        lines = [f"b={b}, h={h}"]
        for r in range(0, rows, row_step):
            line = ""
            for c in range(0, cols, col_step):
                cell_full = full[b, h, r : r + row_step, c : c + col_step]
                cell_visited = visited[b, h, r : r + row_step, c : c + col_step]
                line += "██" if bool(cell_full.all()) else "  " if not bool(cell_visited.any()) else "░░"
            lines.append(line)
        pictures.append("\n".join(lines))
    return "\n".join(pictures)
