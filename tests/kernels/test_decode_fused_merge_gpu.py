"""The decode kernel's fused merge on the GPU (bf16, B8 Hq32 Hkv8 E128, 8k caches): the last split of
each tile merges in the same launch, ordered by a barrier and an acq_rel atomic (``decode.py``).

What the interpreter cannot show: that a merging program sees every other split's partial. The
merge order is fixed (split 0, 1, ...), whatever order the splits arrive in, so repeated calls must
give the same bits; a program that read a partial before it was written would not.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexattn import Positions, create_block_mask
from flexattn.kernels import decode_workspace
from flexattn.options import KernelOptions
from flexattn.plan import plan_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, HQ, HKV, E, L = 8, 32, 8, 128, 8192


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _plans(lq: int, mask):
    slopes = torch.rand(HQ, device="cuda")

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) * 0.01

    return [
        plan_attention(
            alibi,
            mask,
            lq,
            L,
            1 / math.sqrt(E),
            KernelOptions(BACKEND="TRITON", DECODE_MERGE=m),
            torch.device("cuda"),
            torch.bfloat16,
        )  # fmt: skip
        for m in ("KERNEL", "FUSED")
    ]


@pytest.mark.parametrize("lq", [1, 4, 16], ids=lambda n: f"Lq{n}")
def test_fused_merge_equals_the_merge_kernel_and_repeats_bit_for_bit(lq):
    q = torch.randn(B, HQ, lq, E, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([8192, 0, 4000, 1, 8191, 300, 6000, 128], dtype=torch.int32, device="cuda")
    positions = Positions(q_offset=(lengths - lq).clamp(min=0), kv_lengths=lengths)
    mask = create_block_mask(_causal, None, None, L, L, device="cuda")
    by_kernel, fused = _plans(lq, mask)
    assert fused.choose(q, k, v, positions=positions).kind == "decode"
    out_k, lse_k, max_k = by_kernel.forward(q, k, v, positions=positions)
    out, lse, mx = fused.forward(q, k, v, positions=positions)
    torch.testing.assert_close(out, out_k, rtol=2**-7, atol=1e-5)  # (at most one bf16 rounding apart)
    torch.testing.assert_close(lse, lse_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(mx, max_k)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()  # the sequence with no keys
    for i in range(200):
        again, lse_again, _ = fused.forward(q, k, v, positions=positions)
        assert torch.equal(again, out) and torch.equal(lse_again, lse), f"call {i} differs"
    torch.cuda.synchronize()
    for work in decode_workspace._WORKSPACES.values():
        assert (work.arrivals == 0).all()


def test_fused_merge_replays_in_a_cuda_graph():
    """Captured once, replayed with new contents and lengths: equal to the eager fused call."""
    lq = 4
    q = torch.randn(B, HQ, lq, E, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([8192, 17, 4000, 5, 8191, 300, 6000, 128], dtype=torch.int32, device="cuda")
    positions = Positions(q_offset=lengths - lq, kv_lengths=lengths)
    mask = create_block_mask(_causal, None, None, L, L, device="cuda")
    _, fused = _plans(lq, mask)
    fused.forward(q, k, v, positions=positions)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _, _ = fused.forward(q, k, v, positions=positions)
    for step in range(3):
        q.normal_(), k.normal_(), v.normal_()
        lengths.copy_(torch.randint(lq, L + 1, (B,), dtype=torch.int32))
        positions.q_offset.copy_(lengths - lq)
        graph.replay()
        eager, _, _ = fused.forward(q, k, v, positions=positions)
        torch.testing.assert_close(captured, eager, atol=0, rtol=0, msg=f"replay {step}")
