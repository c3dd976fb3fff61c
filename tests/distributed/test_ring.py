"""ring_flex_attention on 2, 3 and 4 gloo ranks equals single-device flex_attention (float64, reference
backend): out, lse, dq, dk, dv and a learnable captured table's gradient, for causal, document,
sliding-window and padded-document masks, ALiBi and a relative-bias score_mod, every plan strategy,
both schedules (ring, direct), with and without recompute.
It makes exactly the calls the mask needs: pairs with no visited block are skipped.

One spawn per world size runs all its cases (tests/distributed/ring_cases.py); a hang fails after
the timeout.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.ring_cases import CASES, run_cases
from tests.distributed.spawn_ranks import run_ranks
from tests.helpers import DEFAULT_FLOOR

TOLERANCE = DEFAULT_FLOOR[torch.float64]
CASES_PER_WORLD = {
    2: [name for name in CASES if not name.endswith("-small")],  # -small: the interpreter test's
    3: ["causal-contiguous-bias", "document-balanced-bias-direct", "padded-documents-bias-recompute"],
    4: ["document-zigzag-bias", "window-contiguous-direct-recompute"],
}
MUST_SKIP = {
    "causal-contiguous-bias",
    "window-contiguous-alibi",
    "window-contiguous-direct-recompute",
}  # some (rank, step) pairs see nothing


@pytest.mark.parametrize("world", sorted(CASES_PER_WORLD), ids=lambda w: f"ranks{w}")
def test_ring_equals_single_device_and_skips_invisible_shards(world):
    names = CASES_PER_WORLD[world]
    per_rank = run_ranks(run_cases, world, names, timeout=240)
    failures = []
    for name in names:
        results = [per_rank[rank][name] for rank in range(world)]
        for rank, r in enumerate(results):
            bad = {k: e for k, e in r["errors"].items() if not e <= TOLERANCE}
            if bad:
                failures.append(f"{name} rank {rank}: errors above {TOLERANCE}: {bad}")
            direct = CASES[name].schedule == "direct"
            if direct and r["received"] != r["needed"]:
                failures.append(f"{name} rank {rank}: received K/V of {r['received']}, needs {r['needed']}")
            if not direct and r["received"] != sorted((rank - t) % world for t in range(1, world)):
                failures.append(f"{name} rank {rank}: the ring brought K/V of {r['received']} only")
            if r["calls"] != r["expected_calls"]:
                failures.append(f"{name} rank {rank}: calls {r['calls']} != mask's {r['expected_calls']}")
        skipped = sum(r["pairs"] - len(r["calls"]) for r in results)
        if name in MUST_SKIP and skipped == 0:
            failures.append(f"{name}: no pair skipped")
        direct = CASES[name].schedule == "direct"
        if direct and name in MUST_SKIP and all(len(r["received"]) == world - 1 for r in results):
            failures.append(f"{name}: the direct schedule sent every shard to every rank")
        if name.startswith("padded") and sum(r["empty_rows"] for r in results) == 0:
            failures.append(f"{name}: no row without keys (lse -inf) was tested")
        if "bias" in name and "dtable" not in results[0]["errors"]:
            failures.append(f"{name}: the captured table's gradient was not compared")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"ranks{w}")
def test_ring_on_gpus_with_nccl_follows_the_three_way_rule(world):
    """fp32 Triton kernels on `world` GPUs over NCCL vs float64 gold: err <= 3 * err(fp32 eager) + floor."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    names = ["causal-zigzag", "document-balanced-alibi", "document-zigzag-bias", "padded-documents-balanced"]
    per_rank = run_ranks(run_cases, world, names, "cuda", torch.float32, timeout=600, backend="nccl")
    assert_three_way(per_rank, names, DEFAULT_FLOOR[torch.float32])


def test_ring_through_the_triton_kernels_in_the_interpreter():
    """The kernel path the GPUs take (mods shifted by captured offsets, compiled), on 2 gloo ranks."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (scripts/test.sh sets it)")
    names = ["document-zigzag-bias-small"]
    per_rank = run_ranks(run_cases, 2, names, "cpu", torch.float32, "TRITON", timeout=300)
    assert_three_way(per_rank, names, DEFAULT_FLOOR[torch.float32])
    assert all(r[names[0]]["calls"] == r[names[0]]["expected_calls"] for r in per_rank)


def assert_three_way(per_rank, names, floor):
    failures = []
    for name in names:
        for rank, result in enumerate(r[name] for r in per_rank):
            for key, err in result["errors"].items():
                eager = result["eager_errors"][key]
                if not err <= 3 * eager + floor:
                    failures.append(f"{name} rank {rank} {key}: {err:.2e} vs eager {eager:.2e}")
    assert not failures, "\n".join(failures)
