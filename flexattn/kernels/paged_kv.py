"""PagedKV: where K/V rows live when the cache is paged (the kernels' view of a page table).

A paged cache holds every sequence's keys in one tensor ``k_cache (1, HKV, N_PAGES * PAGE, E)`` (and
``v_cache (1, HKV, N_PAGES * PAGE, EV)``), cut into pages of PAGE rows. Logical row ``r`` of sequence
``b`` (the position the mods and the block mask see) lives at physical row

    page_table[b, r // PAGE] * PAGE + r % PAGE

and the kernels read it there (``tile_io.load_paged_kv_tile``): no gather copy. A page-table entry of
-1 means no page is reserved; the user-facing ``flexattn.paged.PagedAttention`` builds block masks
that never let such rows reach the softmax. The contiguous case has no PagedKV (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedKV:
    """A page table over paged K/V caches.

    Attributes:
        page_table: int32 (B, MAX_PAGES) on the caches' device, row b for the call's batch element b;
            entry p is the physical page of logical page p, or -1 (not reserved).
        page_size: rows per page (PAGE), a positive multiple of 16.
        kv_len: the logical key length of the call (the block mask's KV_LEN), <= MAX_PAGES * PAGE.
    """

    page_table: torch.Tensor
    page_size: int
    kv_len: int

    def check(self, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: int) -> None:
        """Raise ValueError naming the argument when the caches or the table do not fit a call of ``batch``."""
        pt = self.page_table
        if pt.dtype != torch.int32 or pt.dim() != 2 or pt.shape[0] != batch:
            raise ValueError(
                f"PagedKV.page_table must be int32 (B={batch}, MAX_PAGES), got {pt.dtype} {tuple(pt.shape)}"
            )
        if pt.device != k_cache.device:
            raise ValueError(f"PagedKV.page_table is on {pt.device}, the caches on {k_cache.device}")
        if self.page_size <= 0 or self.page_size % 16:
            raise ValueError(f"PagedKV.page_size must be a positive multiple of 16, got {self.page_size}")
        if not 0 < self.kv_len <= pt.shape[1] * self.page_size:
            raise ValueError(
                f"PagedKV.kv_len={self.kv_len} must lie in [1, MAX_PAGES * page_size = "
                f"{pt.shape[1] * self.page_size}]"
            )
        for name, cache in (("key", k_cache), ("value", v_cache)):
            if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[2] % self.page_size:
                raise ValueError(
                    f"The paged {name} cache must be (1, Hkv, n_pages * page_size, E) with page_size="
                    f"{self.page_size}, got {tuple(cache.shape)}"
                )
        for name, cache in (("key", k_cache), ("value", v_cache)):
            last = (cache.shape[2] - 1) * cache.stride(2) + (cache.shape[3] - 1) * cache.stride(3)
            if last >= 2**31:  # the tile loader addresses rows within a head with int32 offsets
                raise ValueError(
                    f"The paged {name} cache spans {last + 1} elements within one head (strides "
                    f"{cache.stride()}), more than 2**31: split it into several caches"
                )
        if k_cache.shape[1:3] != v_cache.shape[1:3]:
            raise ValueError(
                f"The key and value caches must share (Hkv, rows), got {tuple(k_cache.shape)} and "
                f"{tuple(v_cache.shape)}"
            )

    def physical_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, reserved)``: int64 (B, kv_len) physical row of each logical row, and whether its
        page is reserved (rows of unreserved pages point at row r % PAGE of page 0)."""
        logical = torch.arange(self.kv_len, device=self.page_table.device)
        pages = self.page_table[:, logical // self.page_size].long()  # (B, kv_len)
        return pages.clamp(min=0) * self.page_size + logical % self.page_size, pages >= 0

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """The contiguous (B, Hkv, kv_len, D) copy of a paged cache (1, Hkv, rows, D); rows of
        unreserved pages are zero. For the reference backend and tests: the kernels never copy."""
        rows, reserved = self.physical_rows()
        B, L = rows.shape
        out = cache[0][:, rows.reshape(-1)].reshape(cache.shape[1], B, L, cache.shape[3]).transpose(0, 1)
        return torch.where(
            reserved[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
