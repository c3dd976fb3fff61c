"""The shared mod catalog itself: it covers every ready-made variant and every entry is well formed."""

from __future__ import annotations

import inspect

import pytest
import torch

from flexattn import create_block_mask, create_mask
from flexattn import variants as V
from tests import catalog
from tests.catalog import CATALOG, MASK_MODS, SCORE_MODS, Mods
from tests.helpers import Shape, gold_and_eager, make_qkv

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


WITH_PARAMS = [name for name in CATALOG if CATALOG[name](1, 1, 1, 1, "cpu").params]


@pytest.mark.parametrize("entry", WITH_PARAMS)
def test_learnable_params_have_gradients_a_relative_bound_can_judge(entry):
    """A captured parameter whose gradient is zero in exact arithmetic (a bias constant along a
    softmax row cancels) has a float64 gold of pure rounding noise: err / max|gold| is then random and
    every three-way check of it is a coin toss. The catalog holds no such parameter."""
    shape = Shape(B=2, Hq=4, Lq=33, Lkv=40, E=16)
    mods = CATALOG[entry](shape.B, shape.Hq, shape.Lq, shape.lkv, "cpu")
    params = [p.requires_grad_() for p in mods.params]
    q, k, v = make_qkv(shape, torch.float32, requires_grad=True)
    mask = (
        None
        if mods.mask_mod is None
        else create_block_mask(
            mods.mask_mod, shape.B, shape.Hq, shape.Lq, shape.lkv, device="cpu", BLOCK_SIZE=16
        )
    )
    dout = torch.randn(shape.B, shape.Hq, shape.Lq, shape.ev)
    gold, _ = gold_and_eager(q, k, v, score_mod=mods.score_mod, block_mask=mask, dout=dout, params=params)
    dq_scale = gold.grads[0].abs().max().item()
    for i, grad in enumerate(gold.grads[3:]):
        assert grad is not None and grad.abs().max().item() > 1e-6 * dq_scale, (
            f"{entry}: param {i}'s gradient vanishes (max {grad.abs().max().item():.3g} against "
            f"dq's {dq_scale:.3g})"
        )
