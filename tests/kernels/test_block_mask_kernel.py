"""create_block_mask's generated kernel (backend="triton"), specified against the torch builder.

Run through Triton's interpreter on CPU (TRITON_INTERPRET=1): both builders must list exactly the
same partial and full blocks, on both sides (kv lists and the transposed q lists), for every mask mod
of the catalog and the attention-gym masks, any block size (square or not), lengths that are not
multiples of the block size, broadcast and per-batch/per-head masks.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import and_masks, create_block_mask, or_masks
from flexattn import variants as V
from flexattn.compiler import codegen_count
from tests.catalog import MASK_MODS
from tests.test_block_mask import assert_well_formed

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton builder needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def assert_same_blocks(mask_mod, B, H, Lq, Lkv, block, separate_full=True):
    """The kernel's BlockMask equals the torch builder's, block for block, on both sides."""
    args = (mask_mod, B, H, Lq, Lkv)
    kwargs = dict(device=DEVICE, BLOCK_SIZE=block, separate_full_blocks=separate_full)
    got = create_block_mask(*args, **kwargs, backend="triton")
    want = create_block_mask(*args, **kwargs, backend="torch")
    assert got.shape == want.shape and got.BLOCK_SIZE == want.BLOCK_SIZE and got.mask_mod is mask_mod
    assert torch.equal(got._dense_blocks(full=False), want._dense_blocks(full=False)), "partial blocks differ"
    assert torch.equal(got._dense_blocks(full=True), want._dense_blocks(full=True)), "full blocks differ"
    for name in ("kv_num_blocks", "q_num_blocks", "full_kv_num_blocks", "full_q_num_blocks"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert_well_formed(got.to("cpu"))
    return got


GRIDS = [
    # (B, H, Lq, Lkv, BLOCK_SIZE)
    (2, 2, 37, 53, 16),
    (1, 2, 64, 96, (16, 32)),
    (2, 1, 97, 31, (32, 8)),
]


@pytest.mark.parametrize("grid", GRIDS, ids=[f"B{g[0]}-H{g[1]}-L{g[2]}x{g[3]}-blk{g[4]}" for g in GRIDS])
@pytest.mark.parametrize("entry", list(MASK_MODS), ids=list(MASK_MODS))
def test_catalog_masks_match_the_torch_builder(entry, grid):
    B, H, Lq, Lkv, block = grid
    assert_same_blocks(MASK_MODS[entry](B, H, Lq, Lkv, DEVICE), B, H, Lq, Lkv, block)
