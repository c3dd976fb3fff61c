"""``_lower_bound``, the decode kernel's search of a sorted block list, against ``torch.searchsorted``.

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

from flexattn.kernels.decode import _lower_bound

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
