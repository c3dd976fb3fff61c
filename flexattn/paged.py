"""Paged KV caches: fixed-size pages, a page table per sequence, block masks bound to the table.

A drop-in for PyTorch's experimental ``torch.nn.attention.experimental._paged_attention.PagedAttention``
where its API fits (same constructor, ``reserve``, ``erase``, ``assign``, ``convert_logical_block_mask``,
``get_mask_mod``, ``get_score_mod``). One difference in design: flexattn's kernels read K/V *through
the page table* and keep every position logical, so

- the converted block mask still lists logical kv blocks (it carries the page table to the kernels
  as a :class:`flexattn.kernels.paged_kv.PagedKV`); the mods see logical positions, so
  ``get_score_mod`` / ``get_mask_mod`` only add the optional ``kv_len`` bound;
- a page may be smaller than the mask's KV block (any multiple of 16 that divides it).

Typical use (one layer's caches; ``n_pages * page_size`` rows shared by every sequence)::

    paged = PagedAttention(n_pages=64, page_size=64, max_batch_size=4, device="cuda")
    k_cache = torch.zeros(1, Hkv, 64 * 64, E, device="cuda", dtype=torch.bfloat16)  # zeros: see below
    v_cache = torch.zeros_like(k_cache)
    for b, length in enumerate(prompt_lengths):
        paged.reserve(b, length)
    paged.assign(batch_idx, input_pos, k, v, k_cache, v_cache)         # write logical positions
    causal = create_block_mask(lambda b, h, i, j: i >= j, B, None, L, L, device="cuda")
    mask = paged.convert_logical_block_mask(causal, batch_idx, kv_len=lengths)
    out = flex_attention(q, k_cache, v_cache, block_mask=mask, enable_gqa=True)

A key exists when its page is reserved and, if ``kv_len`` is given, its position is below
``kv_len[b]``; the converted mask never lets other keys reach the softmax. Allocate the caches with
zeros: as with a contiguous cache, masked keys of a visited tile still pass through ``p @ v`` with
``p = 0``, so a NaN left in an unwritten row would spread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from flexattn.block_mask import BlockMask, and_masks, noop_mask
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.paged_kv import PagedKV

PAGE_MULTIPLE = 16  # the kernels' smallest tile; a page holds whole 16-row groups


@dataclass(eq=False)
class PagedBlockMask(BlockMask):
    """A BlockMask in logical positions bound to a page table (``kv_pages``): pass it with the
    paged caches as key / value to :func:`flexattn.flex_attention`."""

    kv_pages: PagedKV | None = None

    def to(self, device: torch.device | str) -> PagedBlockMask:
        """A copy with every tensor, the page table too, on ``device``."""
        moved = super().to(device)
        pages = self.kv_pages
        moved.kv_pages = None if pages is None else replace(pages, page_table=pages.page_table.to(device))
        return moved

    def __getitem__(self, index):
        raise ValueError(
            "A PagedBlockMask is bound to the page-table rows of its batch: slice the logical mask, then "
            "convert the slice with PagedAttention.convert_logical_block_mask(mask, batch_idx)."
        )


class PagedAttention:
    """Page allocator and page table for paged K/V caches of ``n_pages * page_size`` rows.

    Args:
        n_pages: physical pages in the caches.
        page_size: rows per page, a positive multiple of 16.
        max_batch_size: sequences (rows of the page table).
        device: where the page table lives (the caches' device).
        max_pages_per_seq: columns of the page table (default ``n_pages``): a sequence holds at most
            ``max_pages_per_seq * page_size`` positions.

    Attributes:
        page_table: int32 (max_batch_size, max_pages_per_seq) on ``device``: physical page of each
            logical page, -1 where none is reserved.
        capacity: list of int, positions reserved per sequence (a multiple of page_size).

    Example:
        >>> paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=2, device="cpu")
        >>> paged.reserve(0, 40)
        >>> paged.page_table[0, :4].tolist(), paged.capacity[0], paged.free_pages
        ([0, 1, 2, -1], 48, 5)
    """

    def __init__(
        self,
        n_pages: int,
        page_size: int,
        max_batch_size: int,
        device: str | torch.device = "cuda",
        *,
        max_pages_per_seq: int | None = None,
    ) -> None:
        for name, value in (("n_pages", n_pages), ("max_batch_size", max_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedAttention: {name} must be a positive int, got {value!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0 or page_size % 16:
            raise ValueError(
                f"PagedAttention: page_size must be a positive multiple of {PAGE_MULTIPLE} (the kernels' "
                f"smallest tile), got {page_size!r}; e.g. 16, 64 or 256"
            )
        max_pages_per_seq = n_pages if max_pages_per_seq is None else max_pages_per_seq
        if (
            isinstance(max_pages_per_seq, bool)
            or not isinstance(max_pages_per_seq, int)
            or max_pages_per_seq <= 0
        ):
            raise ValueError(
                f"PagedAttention: max_pages_per_seq must be a positive int, got {max_pages_per_seq!r}"
            )
        self.n_pages, self.page_size, self.max_batch_size = n_pages, page_size, max_batch_size
        self.max_pages_per_seq = max_pages_per_seq
        self.device = torch.device(device)
        self.page_table = torch.full(
            (max_batch_size, max_pages_per_seq), -1, dtype=torch.int32, device=device
        )
        self.capacity = [0] * max_batch_size
        self._capacity_dev = torch.zeros(max_batch_size, dtype=torch.int32, device=device)  # checks on device
        self._pages: list[list[int]] = [[] for _ in range(max_batch_size)]  # physical pages, logical order
        self._free = list(range(n_pages - 1, -1, -1))  # a stack: pop() hands out the lowest page first
        self._last_rows: tuple | None = None  # the last assign's index tensors and rows (_rows)

    # ---- bookkeeping ------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages not reserved by any sequence."""
        return len(self._free)

    @property
    def max_seq_len(self) -> int:
        """The most positions one sequence can hold (``max_pages_per_seq * page_size``)."""
        return self.max_pages_per_seq * self.page_size

    def allocate(self, seq_len: int) -> int:
        """Reserve ``seq_len`` positions for a new sequence in the first empty batch slot; its index.

        Raises ValueError when every slot holds a sequence (``erase`` one) or pages run out.
        """
        for batch_idx, pages in enumerate(self._pages):
            if not pages:
                self.reserve(batch_idx, seq_len)
                return batch_idx
        raise ValueError(
            f"PagedAttention.allocate: all {self.max_batch_size} batch slots hold a sequence; erase one first"
        )

    def reserve(self, batch_idx: int | torch.Tensor, seq_len: int | torch.Tensor) -> None:
        """Grow the capacity of sequence(s) ``batch_idx`` to at least ``seq_len`` positions.

        Args:
            batch_idx: int or int tensor (n,) (PyTorch passes a 1-element tensor).
            seq_len: int or int tensor of the same number of elements.
        Pages are taken from the free list; a sequence that already holds enough keeps its pages.
        Nothing is reserved when the request cannot be met in full (ValueError: out of pages, or
        past ``max_pages_per_seq``).
        """
        batches, lengths = _ints(batch_idx, "batch_idx"), _ints(seq_len, "seq_len")
        if len(batches) != len(lengths):
            raise ValueError(
                f"PagedAttention.reserve: batch_idx has {len(batches)} entries but seq_len {len(lengths)}"
            )
        need = {}
        for b, length in zip(batches, lengths):
            self._check_batch(b, "reserve")
            if length < 0:
                raise ValueError(f"PagedAttention.reserve: seq_len must be >= 0, got {length}")
            pages = -(-length // self.page_size)
            if pages > self.max_pages_per_seq:
                raise ValueError(
                    f"PagedAttention.reserve: seq_len={length} needs {pages} pages of {self.page_size}, "
                    f"but a sequence holds at most max_pages_per_seq={self.max_pages_per_seq} "
                    f"({self.max_seq_len} positions); construct PagedAttention with a larger "
                    "max_pages_per_seq"
                )
            need[b] = max(need.get(b, 0), pages - len(self._pages[b]))
        total = sum(n for n in need.values() if n > 0)
        if total > len(self._free):
            raise ValueError(
                f"PagedAttention.reserve: out of pages: {total} more pages of {self.page_size} requested, "
                f"{len(self._free)} free of {self.n_pages}; erase finished sequences or build the cache "
                "with more pages"
            )
        for b, n in need.items():
            if n <= 0:
                continue
            new = [self._free.pop() for _ in range(n)]
            start = len(self._pages[b])
            self._pages[b].extend(new)
            pages = torch.tensor(new, dtype=torch.int32, device="cpu")  # copied without waiting for the GPU
            self.page_table[b, start : start + n] = pages.to(self.device, non_blocking=True)
            self.capacity[b] = len(self._pages[b]) * self.page_size
            self._capacity_dev[b] = self.capacity[b]

    def erase(self, batch_idx: int | torch.Tensor) -> None:
        """Free every page of sequence(s) ``batch_idx`` (int or int tensor (n,)); capacity becomes 0."""
        for b in _ints(batch_idx, "batch_idx"):
            self._check_batch(b, "erase")
            self._free.extend(reversed(self._pages[b]))
            self._pages[b] = []
            self.capacity[b] = 0
            self._capacity_dev[b] = 0
            self.page_table[b] = -1

    def assign(
        self,
        batch_idx: torch.Tensor,
        input_pos: torch.Tensor,
        k_val: torch.Tensor,
        v_val: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        """Write keys/values at logical positions of their sequences into the paged caches.

        Args:
            batch_idx: int tensor (B,): the sequences written.
            input_pos: int tensor (B, S): logical position of each new row (reserved beforehand).
            k_val: (B, Hkv, S, E); v_val: (B, Hkv, S, Ev); no gradient.
            k_cache: (1, Hkv, n_pages * page_size, E); v_cache: (1, Hkv, n_pages * page_size, Ev).
        Positions outside the reserved capacity raise ValueError when ``batch_idx`` and ``input_pos``
        are CPU tensors (read on the host). Device tensors are checked on the device without
        synchronising (``torch._assert_async``: a bad position fails the next synchronising call, like
        an out-of-range index in PyTorch), and not at all while a CUDA graph is being captured.
        """
        if k_val.requires_grad or v_val.requires_grad:
            raise ValueError("PagedAttention.assign: k_val / v_val must not require grad (detach them)")
        B, H, S, E = k_val.shape
        rows = self.n_pages * self.page_size
        if batch_idx.dim() != 1 or batch_idx.shape[0] != B:
            raise ValueError(
                f"PagedAttention.assign: batch_idx must be (B={B},), got {tuple(batch_idx.shape)}"
            )
        if tuple(input_pos.shape) != (B, S):
            raise ValueError(
                f"PagedAttention.assign: input_pos must be (B, S)=({B}, {S}), got {tuple(input_pos.shape)}"
            )
        if tuple(v_val.shape[:3]) != (B, H, S):
            raise ValueError(
                f"PagedAttention.assign: v_val {tuple(v_val.shape)} must match k_val {tuple(k_val.shape)}"
            )
        for name, cache, val in (("k_cache", k_cache, k_val), ("v_cache", v_cache, v_val)):
            if tuple(cache.shape) != (1, H, rows, val.shape[3]):
                raise ValueError(
                    f"PagedAttention.assign: {name} must be (1, {H}, n_pages * page_size = {rows}, "
                    f"{val.shape[3]}), got {tuple(cache.shape)}"
                )
        addr = self._rows(batch_idx, input_pos)  # (B * S,)
        k_cache[0][:, addr] = k_val.transpose(0, 1).reshape(H, B * S, E).to(k_cache.dtype)
        v_cache[0][:, addr] = v_val.transpose(0, 1).reshape(H, B * S, v_val.shape[3]).to(v_cache.dtype)

    def _rows(self, batch_idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Cache rows (B * S,) of the logical positions, checked (see ``assign``). The layers of a
        model step write the same positions: a call with the very tensors of the previous one,
        unchanged (versions), under an unchanged page table and on the same stream, reuses its
        checked rows (never while a CUDA graph is captured or torch.compile traces)."""
        state = None
        if not _unchecked(self.page_table):  # (a device tensor: compiling, or this device capturing)
            cuda = self.device.type == "cuda"
            stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else None
            state = (batch_idx, input_pos, self.page_table, batch_idx._version, input_pos._version,
                     self.page_table._version, stream)  # fmt: skip
            last = self._last_rows
            if last is not None and _same_state(last[0], state):
                return last[1]
        self._check_positions(batch_idx, input_pos)  # (skipped while capturing: _unchecked)
        table = self.page_table[batch_idx.to(self.device, non_blocking=True).long()]  # (B, MAX_PAGES)
        pos = input_pos.to(self.device, non_blocking=True).long()
        pages = torch.gather(table, 1, pos // self.page_size).long()
        addr = (pages * self.page_size + pos % self.page_size).reshape(-1)
        self._last_rows = None if state is None else (state, addr)
        return addr

    # ---- block masks and mods in logical positions -------------------------------------------------

    def convert_logical_block_mask(
        self,
        block_mask: BlockMask,
        batch_idx: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
    ) -> PagedBlockMask:
        """Bind a block mask over logical positions to the page table.

        Args:
            block_mask: from ``create_block_mask`` over (Q_LEN, KV_LEN) logical positions, batch 1
                or ``len(batch_idx)``; its KV block a multiple of page_size; KV_LEN <= ``max_seq_len``.
            batch_idx: int tensor (B,): the page-table rows of the call's batch elements
                (default: 0 .. B-1, B the mask's batch).
            kv_len: int tensor (B,) or None: keys at positions >= kv_len[b] do not exist.
        Returns:
            a :class:`PagedBlockMask` (B, H, ...): the same blocks minus those without a live key;
            blocks only partly live are partial, and its mask_mod adds "the key exists".
            Pass it with the caches: ``flex_attention(q, k_cache, v_cache, block_mask=...)``.

        The block lists are computed on the device with no host synchronisation: ``batch_idx`` is
        range-checked on the host when it is a CPU tensor, on the device otherwise (see ``assign``).
        """
        q_len, kv_len_max = block_mask.seq_lengths
        q_block, kv_block = block_mask.BLOCK_SIZE
        if kv_block % self.page_size:
            raise ValueError(
                f"convert_logical_block_mask: page_size={self.page_size} must divide the block mask's KV "
                f"block {kv_block} (BLOCK_SIZE={block_mask.BLOCK_SIZE}); build the mask with a KV block "
                f"that is a multiple of {self.page_size}"
            )
        if kv_len_max > self.max_seq_len:
            raise ValueError(
                f"convert_logical_block_mask: the mask has KV_LEN={kv_len_max} but a sequence holds at most "
                f"{self.max_seq_len} positions (max_pages_per_seq={self.max_pages_per_seq} x page_size="
                f"{self.page_size})"
            )
        device = block_mask.kv_num_blocks.device
        mask_b = block_mask.kv_num_blocks.shape[0]
        if batch_idx is None:
            batch_idx = torch.arange(mask_b, device=device)
        if batch_idx.dim() != 1 or batch_idx.dtype.is_floating_point:
            raise ValueError(
                f"convert_logical_block_mask: batch_idx must be an int tensor (B,), got {batch_idx}"
            )
        B = batch_idx.shape[0]
        if mask_b not in (1, B):
            raise ValueError(
                f"convert_logical_block_mask: the mask has batch {mask_b}; batch_idx has {B} entries"
            )
        self._check_batches(batch_idx, "convert_logical_block_mask")
        if kv_len is not None and (kv_len.dim() != 1 or kv_len.shape[0] != B):
            raise ValueError(
                f"convert_logical_block_mask: kv_len must be an int tensor (B={B},), "
                f"got {tuple(kv_len.shape)}"
            )
        rows = batch_idx.to(self.page_table.device, non_blocking=True).long()
        table = self.page_table[rows].to(device, non_blocking=True)  # (B, MAX_PAGES)
        if kv_len is not None:
            kv_len = kv_len.to(device, non_blocking=True)
        live = _live_rows_per_block(table, self.page_size, kv_block, kv_len_max, kv_len)  # (B, NKV)
        whole = (kv_len_max - torch.arange(live.shape[1], device=device) * kv_block).clamp(max=kv_block)
        num, idx, full_num, full_idx = _restrict_blocks(block_mask, B, live > 0, live == whole)

        exists = _key_exists(table, self.page_size, kv_len)
        return PagedBlockMask(
            seq_lengths=(q_len, kv_len_max),
            block_tables=BlockTables(num, idx, full_num, full_idx, None, None, None, None, q_block, kv_block),
            mask_mod=and_masks(block_mask.mask_mod, exists),
            kv_pages=PagedKV(table.to(torch.int32).contiguous(), self.page_size, kv_len_max),
        )

    def get_mask_mod(self, mask_mod: Callable | None, kv_len: torch.Tensor | None = None) -> Callable:
        """``mask_mod`` for the paged call. Positions are logical already, so this only adds the
        ``kv_idx < kv_len[b]`` bound when ``kv_len`` (int tensor (B,)) is given."""
        mask_mod = noop_mask if mask_mod is None else mask_mod
        if kv_len is None:
            return mask_mod

        def within_kv_len(b, h, q_idx, kv_idx):
            return kv_idx < kv_len[b]

        return and_masks(mask_mod, within_kv_len)

    def get_score_mod(
        self, score_mod: Callable | None, kv_len: torch.Tensor | None = None
    ) -> Callable | None:
        """``score_mod`` for the paged call: unchanged (positions are logical), with scores of keys at
        ``kv_idx >= kv_len[b]`` set to -inf when ``kv_len`` (int tensor (B,)) is given."""
        if kv_len is None:
            return score_mod

        def bounded(score, b, h, q_idx, kv_idx):
            s = score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)
            return torch.where(kv_idx < kv_len[b], s, float("-inf"))

        return bounded

    # ---- checks -----------------------------------------------------------------------------------

    def _check_batch(self, b: int, what: str) -> None:
        if not 0 <= b < self.max_batch_size:
            raise ValueError(
                f"PagedAttention.{what}: batch index {b} is out of range [0, {self.max_batch_size}) "
                "(max_batch_size)"
            )

    def _check_batches(self, batch_idx: torch.Tensor, what: str) -> None:
        """Range-check batch indices: on the host for CPU tensors, on the device (no sync) otherwise."""
        if not batch_idx.numel() or _unchecked(batch_idx):
            return
        if batch_idx.device.type != "cpu":
            ok = ((batch_idx >= 0) & (batch_idx < self.max_batch_size)).all()
            torch._assert_async(
                ok, f"PagedAttention.{what}: a batch index is out of range [0, {self.max_batch_size})"
            )
            return
        lo, hi = int(batch_idx.min()), int(batch_idx.max())
        for b in (lo, hi):
            self._check_batch(b, what)

    def _check_positions(self, batch_idx: torch.Tensor, input_pos: torch.Tensor) -> None:
        self._check_batches(batch_idx, "assign")
        if input_pos.numel() == 0 or _unchecked(input_pos):
            return
        if input_pos.device.type != "cpu" or batch_idx.device.type != "cpu":
            rows = batch_idx.to(self.device, non_blocking=True).long()
            capacity = self._capacity_dev[rows.clamp(0, self.max_batch_size - 1)]  # (B,)
            pos = input_pos.to(self.device, non_blocking=True)
            ok = ((pos >= 0) & (pos < capacity[:, None])).all()
            torch._assert_async(
                ok,
                "PagedAttention.assign: an input_pos lies outside the positions reserved for its "
                "sequence; reserve() first",
            )
            return
        capacity = torch.tensor(self.capacity, device="cpu")[batch_idx.long()]
        bad = (input_pos < 0) | (input_pos >= capacity[:, None])
        if bool(bad.any()):
            b, s = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"PagedAttention.assign: input_pos[{b}, {s}]={int(input_pos[b, s])} lies outside the "
                f"{int(capacity[b])} positions reserved for sequence {int(batch_idx[b])}; reserve() first"
            )


def _same_state(a: tuple, b: tuple) -> bool:
    """The same tensors (identity) at the same versions, on the same stream."""
    return a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3:] == b[3:]


def _unchecked(t: torch.Tensor) -> bool:
    """No value check can run here: a CUDA graph is being captured, or torch.compile is tracing."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _ints(value: int | torch.Tensor, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"PagedAttention: {name} must hold integers, got {value.dtype}")
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"PagedAttention: {name} must be an int or an int tensor, got {value!r}")
    return [value]


def _live_rows_per_block(
    table: torch.Tensor, page: int, kv_block: int, kv_len_max: int, kv_len: torch.Tensor | None
) -> torch.Tensor:
    """int (B, NKV): keys of each logical kv block that exist (page reserved, below the length)."""
    B, max_pages = table.shape
    per_block = kv_block // page
    nkv = -(-kv_len_max // kv_block)
    limit = torch.full((B, 1), kv_len_max, device=table.device, dtype=torch.int64)
    if kv_len is not None:
        limit = limit.minimum(kv_len.to(table.device).long()[:, None])
    starts = torch.arange(max_pages, device=table.device) * page
    rows = (limit - starts).clamp(0, page) * (table >= 0)  # (B, MAX_PAGES)
    padded = torch.zeros(B, nkv * per_block, dtype=torch.int64, device=table.device)
    keep = min(max_pages, nkv * per_block)
    padded[:, :keep] = rows[:, :keep]
    return padded.reshape(B, nkv, per_block).sum(-1)


def _restrict_blocks(block_mask: BlockMask, B: int, any_live: torch.Tensor, all_live: torch.Tensor):
    """The mask's kv lists per batch element, without blocks that hold no live key; full blocks
    only partly live join the partial list. Lists stay ascending."""
    H, nq, nkv = block_mask.kv_indices.shape[1:]

    def listed(num, idx):  # (B, H, NQ, NKV) indices and which slots are listed
        idx = idx.expand(B, H, nq, nkv).long()
        slots = torch.arange(nkv, device=idx.device) < num.expand(B, H, nq)[..., None]
        return idx, slots

    def at(flags, idx):  # flags (B, NKV) read at idx (B, H, NQ, NKV)
        return torch.gather(flags[:, None, None, :].expand(B, H, nq, nkv), 3, idx)

    def ordered(keep, idx):  # kept indices first, ascending; the rest 0
        num = keep.sum(-1, dtype=torch.int32)
        ranked = torch.sort(torch.where(keep, idx, nkv), dim=-1).values
        return num.contiguous(), torch.where(ranked < nkv, ranked, 0)[..., :nkv].to(torch.int32).contiguous()

    idx, slots = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    partial_keep = slots & at(any_live, idx)
    if block_mask.full_kv_num_blocks is None:
        num, out_idx = ordered(partial_keep, idx)
        return num, out_idx, None, None
    full_idx, full_slots = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    full_keep = full_slots & at(all_live, full_idx)
    demoted = full_slots & at(any_live, full_idx) & ~full_keep
    num, out_idx = ordered(torch.cat([partial_keep, demoted], -1), torch.cat([idx, full_idx], -1))
    full_num, out_full_idx = ordered(full_keep, full_idx)
    return num, out_idx, full_num, out_full_idx


def _key_exists(table: torch.Tensor, page: int, kv_len: torch.Tensor | None) -> Callable:
    """The mask_mod "key kv_idx of sequence b exists": its page is reserved (and kv_idx < kv_len[b])."""
    if kv_len is None:

        def key_in_reserved_page(b, h, q_idx, kv_idx):
            return table[b, kv_idx // page] >= 0

        return key_in_reserved_page
    lengths = kv_len.to(table.device)

    def key_exists(b, h, q_idx, kv_idx):
        return (table[b, kv_idx // page] >= 0) & (kv_idx < lengths[b])

    return key_exists
