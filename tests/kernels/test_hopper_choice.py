"""Which prefill forward runs (flexattn/kernels/hopper/choice.py): a pure function of the call."""

from __future__ import annotations

import pytest
import torch

from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.hopper.choice import PREFILL_KERNELS, choose_prefill_forward, hopper_tiles
from flexattn.options import PREFILL_KERNELS as OPTION_VALUES
from flexattn.options import KernelOptions

H100 = DeviceLimits((9, 0), 232448, 132)
CALL = dict(
    target=H100, dtype=torch.bfloat16, head_dim=128, v_head_dim=128, q_block=128, kv_block=128, dense=False,
    scale=0.1,
)  # fmt: skip


def test_the_default_is_the_gluon_forward_at_e128_and_over_pages_else_the_triton_one():
    assert KernelOptions().PREFILL_KERNEL is None
    e128 = choose_prefill_forward(requested=None, **CALL)
    assert e128.kind == "gluon" and "E128" in e128.reason, e128
    e64 = choose_prefill_forward(requested=None, **{**CALL, "head_dim": 64, "v_head_dim": 64})
    assert e64.kind == "triton" and "E=64" in e64.reason and "AUTO" in e64.reason, e64
    assert (
        choose_prefill_forward(requested="AUTO", **{**CALL, "head_dim": 64, "v_head_dim": 64}).kind == "gluon"
    )
    uneven = choose_prefill_forward(requested=None, **{**CALL, "v_head_dim": 64})  # (E != Ev: Triton's)
    assert uneven.kind == "triton", uneven
    assert choose_prefill_forward(requested="TRITON", **CALL).kind == "triton"
    for page in (16, 32, 64, 128, 256, 512):
        paged = choose_prefill_forward(requested=None, **{**CALL, "page": page, "kv_block": max(128, page)})
        assert paged.kind == "gluon" and f"{page}-row pages" in paged.reason, paged
        forced = choose_prefill_forward(
            requested="TRITON", **{**CALL, "page": page, "kv_block": max(128, page)}
        )
        assert forced.kind == "triton", forced
    # where the Gluon kernel cannot run, the default over pages is the Triton forward, with the reason
    other = choose_prefill_forward(requested=None, **{**CALL, "page": 48, "kv_block": 384})
    assert other.kind == "triton" and "page_size=48" in other.reason, other
    hopperless = choose_prefill_forward(
        requested=None, **{**CALL, "page": 16, "target": DeviceLimits((8, 0), 166912)}
    )
    assert hopperless.kind == "triton" and "sm_80" in hopperless.reason, hopperless
    assert OPTION_VALUES == PREFILL_KERNELS


@pytest.mark.parametrize("requested", ["AUTO", "GLUON"])
def test_gluon_where_it_can_run(requested):
    choice = choose_prefill_forward(requested=requested, **CALL)
    assert choice.kind == "gluon" and choice.tiles.cta_rows == 128, choice


@pytest.mark.parametrize(
    "change, says",
    [
        ({"target": DeviceLimits((8, 0), 166912)}, "sm_80"),
        ({"target": DeviceLimits((10, 0), 232448)}, "sm_100"),
        ({"target": DeviceLimits()}, "no GPU"),
        ({"dtype": torch.float32}, "fp16/bf16"),
        ({"head_dim": 96, "v_head_dim": 96}, "E=96"),
        ({"v_head_dim": 64}, "Ev=64"),
        ({"page": 48, "kv_block": 384}, "page_size=48"),
        ({"other_knobs": "kernel_options BLOCK_M"}, "BLOCK_M"),
        ({"tma_ok": False}, "TMA"),
        ({"scale": -0.5}, "scale > 0"),
        ({"q_block": 64}, "Q_BLOCK must be 128 or 192"),
        ({"kv_block": 64}, "KV_BLOCK must be a multiple of 128"),
        ({"inline_failure": "no gl spelling"}, "no gl spelling"),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(x),
)
def test_auto_falls_back_to_triton_and_forced_gluon_is_refused_with_the_reason(change, says):
    auto = choose_prefill_forward(requested="AUTO", **{**CALL, **change})
    assert auto.kind == "triton" and says in auto.reason, auto
    forced = choose_prefill_forward(requested="GLUON", **{**CALL, **change})
    assert forced.kind == "unsupported" and says in forced.reason, forced


def test_without_a_block_mask_any_block_size_and_the_measured_tiles():
    dense = {**CALL, "dense": True, "q_block": 64, "kv_block": 64}
    assert choose_prefill_forward(requested="AUTO", **dense).kind == "gluon"
    assert hopper_tiles(head_dim=64, q_block=None).consumers == 3
    assert hopper_tiles(head_dim=64, q_block=None, tail=True).consumers == 2  # three spill on tails
    assert hopper_tiles(head_dim=128, q_block=None).consumers == 2
    assert hopper_tiles(head_dim=128, q_block=192).consumers == 3


def test_unknown_values_are_refused():
    with pytest.raises(ValueError, match="PREFILL_KERNEL"):
        KernelOptions.from_user({"PREFILL_KERNEL": "FLASH"})
    with pytest.raises(ValueError, match="PREFILL_KERNEL"):
        choose_prefill_forward(requested="gluon", **CALL)


@pytest.mark.parametrize("requested", [None, "AUTO", "GLUON"])
def test_a_gluon_build_failure_falls_back_to_triton_unless_gluon_was_forced(monkeypatch, requested):
    """The default and AUTO run the Triton forward where the Gluon one does not build for the mods
    (and remember why); a forced GLUON raises. No GPU: the Gluon launcher is replaced."""
    import triton

    from flexattn import plan as plan_module
    from flexattn.kernels.hopper import choice, forward_ws

    failures = [
        triton.runtime.errors.OutOfResources(300000, 232448, "shared memory"),
        RuntimeError("PassManager::run failed"),
    ]
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    for failure in failures:

        def fails(*args, error=failure, **kwargs):
            raise error

        monkeypatch.setattr(forward_ws, "gluon_forward", fails)
        monkeypatch.setattr(plan_module, "INLINE_FAILURES", {})  # (the plan's reference to the record)
        plan = plan_module.plan_attention(
            lambda score, b, h, q_idx, kv_idx: score * 0.5, None, 256, 256, 0.1,
            KernelOptions(PREFILL_KERNEL=requested), q.device, q.dtype,
        )  # fmt: skip
        prefill = choice.choose_prefill_forward(requested=requested or "AUTO", **{**CALL, "dense": True})
        if requested == "GLUON":
            with pytest.raises(type(failure)):
                plan._gluon_forward(q, q, q, prefill)
        else:
            assert plan._gluon_forward(q, q, q, prefill) is None
            assert str(failure)[:40] in next(iter(plan_module.INLINE_FAILURES.values()))
