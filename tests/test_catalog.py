"""The shared mod catalog itself: it covers every ready-made variant and every entry is well formed."""

from __future__ import annotations

import inspect

import pytest
import torch

from flexattn import create_mask
from flexattn import variants as V
from tests import catalog
from tests.catalog import CATALOG, MASK_MODS, SCORE_MODS, Mods

# Helpers of flexattn.variants that build tensors rather than mods (used by the catalog or not).
TENSOR_HELPERS = {
    "alibi_slopes",
    "document_ids_from_lengths",
    "document_ids_from_offsets",
    "document_offsets",
    "flamingo_query_spans",
    "prepend_sink_slot",
    "t5_buckets",
}


def test_catalog_uses_every_variant_factory():
    source = inspect.getsource(catalog)
    factories = set(V.__all__) - TENSOR_HELPERS
    missing = sorted(name for name in factories if f"V.{name}(" not in source)
    assert not missing, f"add catalog entries for flexattn.variants.{missing}"


def test_catalog_size_and_views():
    assert len(CATALOG) >= 25
    assert set(SCORE_MODS) | set(MASK_MODS) <= set(CATALOG)
    assert SCORE_MODS and MASK_MODS


@pytest.mark.parametrize("entry", list(CATALOG), ids=list(CATALOG))
@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (3, 5, 17, 6)], ids=["B1-H1-L1", "B3-H5-L17/6"])
def test_entries_build_and_evaluate_for_any_size(entry, sizes):
    mods = CATALOG[entry](*sizes, "cpu")
    score_mod, mask_mod = mods  # unpacks like a pair
    assert isinstance(mods, Mods) and (score_mod, mask_mod) == (mods.score_mod, mods.mask_mod)
    assert all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in mods.params)
    for mod in (score_mod, mask_mod):
        if mod is not None:  # every index in range: no out-of-bounds gathers at tiny lengths
            assert create_mask(mod, *sizes, device="cpu").shape == sizes
