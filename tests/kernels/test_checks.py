"""The launchers' shortcuts on a repeat call accept exactly what their full checks accept: the block
tables' one-pass test (``checks._well_formed``) and tensor descriptors built without Triton's
re-validation (``device.descriptor``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from flexattn import create_block_mask
from flexattn.kernels import device
from flexattn.kernels.checks import SIDES, _well_formed, check_block_tables
from flexattn.kernels.device import DeviceLimits, tile_descriptors

B, H, ROWS = 2, 4, 3


def _tables(per_batch=True, per_head=False):
    mask = create_block_mask(
        lambda b, h, q, kv: q >= kv, B if per_batch else None, H if per_head else None, 48, 64,
        device="cpu", BLOCK_SIZE=16,
    )  # fmt: skip
    return mask.tables()


def _edit(tables, name, value):
    return dataclasses.replace(tables, **{name: value})


def _variants():
    """id -> tables: well-formed ones, and one wrong thing at a time."""
    good = _tables()
    num, idx = good.kv_num_blocks, good.kv_indices
    no_full = _edit(_edit(good, "full_kv_num_blocks", None), "full_kv_indices", None)
    variants = {"good": good, "broadcast": _tables(per_batch=False), "per-head": _tables(per_head=True),
                "no-full": no_full}  # fmt: skip
    for name in SIDES["kv"]:
        t = getattr(good, name)
        variants[f"{name}-int64"] = _edit(good, name, t.long())
        variants[f"{name}-extra-dim"] = _edit(good, name, t.unsqueeze(0))
        variants[f"{name}-batch-3"] = _edit(good, name, t[:1].expand(3, *t.shape[1:]))
        variants[f"{name}-meta"] = _edit(good, name, t.to("meta"))
    variants["few-rows"] = _edit(_edit(good, "kv_num_blocks", num[:, :, :2]), "kv_indices", idx[:, :, :2])
    variants["full-num-only"] = _edit(good, "full_kv_indices", None)
    variants["full-idx-only"] = _edit(good, "full_kv_num_blocks", None)
    variants["num-shape-differs"] = _edit(good, "kv_num_blocks", num[:, :, :2])
    variants["cols-differ"] = _edit(good, "full_kv_indices", good.full_kv_indices[..., :2])
    return variants


VARIANTS = _variants()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_one_pass_test_accepts_only_what_the_full_check_accepts(name):
    tables = VARIANTS[name]
    views = [getattr(tables, n) for n in SIDES["kv"]]
    try:
        check_block_tables(tables, "kv", B, H, ROWS, "the test")
        accepted = True
    except ValueError:
        accepted = False
    assert _well_formed(*views, B, H, ROWS) == accepted
    assert accepted == (name in ("good", "broadcast", "per-head", "no-full")), name


def test_a_descriptor_built_without_revalidation_equals_tritons():
    t = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    first = tile_descriptors(((t, 64), (t, 64)), 32, DeviceLimits((9, 0), 232448))
    again = tile_descriptors(((t, 64),), 32, DeviceLimits((9, 0), 232448), compatible=True)
    reference = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 32, 64])
    assert (1, 1, 32, 64) in device._CHECKED_BLOCKS
    assert first[0] == reference and again[0] == reference and type(again[0]) is TensorDescriptor
    with pytest.raises(ValueError, match="power of 2"):  # a block shape never checked gets Triton's checks
        device.descriptor(t, [1, 1, 24, 64])
