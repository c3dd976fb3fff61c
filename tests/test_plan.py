"""The plan of a Triton call: built once from the mods and the mask, and able to say what will run."""

from __future__ import annotations

import torch

from flexattn import create_block_mask
from flexattn.kernels.device import DeviceLimits
from flexattn.options import KernelOptions
from flexattn.plan import plan_attention


def _plan(block_mask=None, length=256):
    alibi = lambda s, b, h, q, kv: s + 0.1 * (kv - q)  # noqa: E731
    return plan_attention(alibi, block_mask, length, length, 0.125, KernelOptions(), torch.device("cpu"))


def test_no_block_mask_means_every_block_full():
    tables = _plan().tables
    assert tables.has_full and int(tables.kv_num_blocks.sum()) == 0
    assert tables.full_kv_num_blocks.flatten().tolist() == [2, 2]  # 256 / 128 full blocks per q block


def test_explain_names_the_target_and_the_tile_choices():
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256, device="cpu")
    plan = _plan(mask)
    q = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16)
    text = plan.explain(q, q, q)
    assert "target: interpreter" in text and "blocks: 128x128, full blocks separate" in text
    hopper = plan.explain(q, q, q, DeviceLimits((9, 0), 232448))
    assert "target: sm_90" in hopper and "Hopper" in hopper and "TMA" in hopper
