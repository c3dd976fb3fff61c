"""examples/train_gpt_packed_cp.py: 2 gloo ranks train to the same losses as one device."""

from __future__ import annotations

from tests.distributed.example_worker import train_small
from tests.distributed.spawn_ranks import run_ranks


def test_two_ranks_give_the_single_device_losses():
    single = train_small(0, 1, "zigzag", context_parallel=False)
    per_rank = run_ranks(train_small, 2, "balanced", timeout=240)
    assert per_rank[0] == per_rank[1]  # every rank reports the all-reduced loss
    for step, (a, b) in enumerate(zip(per_rank[0], single)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: 2 ranks {a}, one device {b}"
