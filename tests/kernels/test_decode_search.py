"""``_lower_bound`` and ``_list_bounds``, the decode kernel's searches of a sorted block list, against
``torch.searchsorted``.

A small CHUNK (4) makes short lists exercise every path: a list within one round of samples
(n <= CHUNK), the bracket round (n <= CHUNK * (CHUNK + 1)) and the looped bracket beyond it.
Through Triton's interpreter on CPU (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from flexattn.kernels.decode import _list_bounds, _lower_bound

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)


@triton.jit
def _search_kernel(IDX, n, TARGETS, OUT, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    tl.store(OUT + i, _lower_bound(IDX, n, tl.load(TARGETS + i), CHUNK))


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 17, 20, 21, 40, 97])
def test_lower_bound_matches_searchsorted(n):
    gen = torch.Generator().manual_seed(1000 + n)
    values = torch.randperm(3 * n + 2, generator=gen)[:n].sort().values.to(torch.int32)  # distinct, sorted
    # the kernel reads only idx_row[:n]: a tail of junk must not change the answer
    row = torch.cat([values, torch.full((7,), -5, dtype=torch.int32)])
    targets = torch.arange(-1, 3 * n + 4, dtype=torch.int32)
    if targets.numel() > 64:  # the first and last targets and a random 60 between (one program each)
        inner = targets[2:-2][torch.randperm(targets.numel() - 4, generator=gen)[:60]]
        targets = torch.cat([targets[:2], inner, targets[-2:]])
    out = torch.empty_like(targets)
    _search_kernel[(targets.numel(),)](row, n, targets, out, CHUNK=4)
    torch.testing.assert_close(out, torch.searchsorted(values, targets, side="left").to(torch.int32))


@triton.jit
def _bounds_kernel(IDX, n, LOS, HIS, FIRST, LAST, COLS, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    first, last = _list_bounds(IDX, n, tl.load(LOS + i), tl.load(HIS + i), COLS, CHUNK)
    tl.store(FIRST + i, first)
    tl.store(LAST + i, last)


@pytest.mark.parametrize("n, cols", [(0, 2), (1, 1), (3, 3), (4, 9), (5, 5), (21, 30)])
def test_list_bounds_match_searchsorted(n, cols):
    """Both bounds of a split's range: one speculative round for n <= CHUNK (4 here; the row's COLS
    slots, n of them listed, the rest junk that must not count), the searches beyond it."""
    gen = torch.Generator().manual_seed(2000 + n)
    values = torch.randperm(3 * n + 2, generator=gen)[:n].sort().values.to(torch.int32)
    row = torch.cat([values, torch.full((cols - n + 7,), -5, dtype=torch.int32)])  # junk past n
    lo = torch.randint(-1, 3 * n + 3, (24,), generator=gen, dtype=torch.int32)
    hi = lo + torch.randint(0, n + 3, (24,), generator=gen, dtype=torch.int32)
    first, last = torch.empty_like(lo), torch.empty_like(lo)
    _bounds_kernel[(lo.numel(),)](row, n, lo, hi, first, last, cols, CHUNK=4)
    torch.testing.assert_close(first, torch.searchsorted(values, lo, side="left").to(torch.int32))
    torch.testing.assert_close(last, torch.searchsorted(values, hi, side="left").to(torch.int32))
