"""The decode kernel at real sizes on the GPU (bf16): decode vs the prefill kernel vs SDPA.

B8 Hq32 Hkv8 E128, caches of 8k keys (and a ragged batch), Lq 1 / 4 / 16. Judged by the three-way rule
against a float64 reference on a slice of the batch (the full float64 reference would be slow).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexattn import Positions, create_block_mask, flex_attention
from flexattn.kernels.forward import flex_forward
from flexattn.options import KernelOptions
from flexattn.plan import plan_attention
from tests.helpers import assert_close_to_gold, gold_and_eager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, HQ, HKV, E, L = 8, 32, 8, 128, 8192


def _qkv(lq: int, L: int = L):
    q = torch.randn(B, HQ, lq, E, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, E, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, L, E, device="cuda", dtype=torch.bfloat16)
    return q, k, v


@pytest.mark.parametrize("lq", [1, 4, 16], ids=lambda n: f"Lq{n}")
def test_decode_matches_prefill_and_sdpa(lq):
    q, k, v = _qkv(lq)
    out = flex_attention(q, k, v, enable_gqa=True)  # the decode kernel (kernel choice)
    plan = plan_attention(None, None, lq, L, 1 / math.sqrt(E), KernelOptions(BACKEND="TRITON"),
                          q.device, q.dtype)  # fmt: skip
    assert plan.choose(q, k, v).kind == "decode"
    prefill, _, _ = flex_forward(
        q, k, v, score_mod=plan.score_mod, mask_mod=plan.mask_mod, tables=plan.tables, scale=plan.scale
    )
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    gold, eager = gold_and_eager(q[:2], k[:2], v[:2])
    assert_close_to_gold(out[:2], gold.out, eager.out, name="decode out")
    assert_close_to_gold(prefill[:2], gold.out, eager.out, name="prefill out")
    assert (out.float() - sdpa.float()).abs().max() < 2e-2
    assert (out.float() - prefill.float()).abs().max() < 2e-2


@pytest.mark.parametrize("lq", [1, 16], ids=lambda n: f"Lq{n}")
def test_decode_causal_alibi_ragged(lq):
    q, k, v = _qkv(lq)
    lengths = torch.tensor([8192, 17, 4000, 1, 8191, 300, 6000, 128], dtype=torch.int32, device="cuda")
    lengths = torch.maximum(lengths, torch.tensor(lq, dtype=torch.int32, device="cuda"))
    positions = Positions(q_offset=lengths - lq, kv_lengths=lengths)
    slopes = torch.rand(HQ, device="cuda")

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) * 0.01

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, L, L, device="cuda")
    out, lse = flex_attention(q, k, v, alibi, mask, enable_gqa=True, positions=positions, return_lse=True)
    for b in (1, 3, 5):  # short sequences: a float64 run per sequence is quick
        n = int(lengths[b])
        short = create_block_mask(causal, None, None, n, n, device="cuda")
        qb = torch.zeros(1, HQ, n, E, device="cuda", dtype=q.dtype)
        qb[:, :, n - lq :] = q[b : b + 1]
        gold, eager = gold_and_eager(
            qb, k[b : b + 1, :, :n], v[b : b + 1, :, :n], score_mod=alibi, block_mask=short
        )
        assert_close_to_gold(
            out[b : b + 1], gold.out[:, :, n - lq :], eager.out[:, :, n - lq :], name=f"out b{b}"
        )
        assert_close_to_gold(lse[b : b + 1], gold.lse[:, :, n - lq :], eager.lse[:, :, n - lq :],
                             name=f"lse b{b}")  # fmt: skip


def test_decode_replays_in_a_cuda_graph():
    """A decode call with per-sequence positions is capturable (no host sync) and replays what it
    computes eagerly, for new cache contents and new lengths written into the same tensors."""
    q, k, v = _qkv(4)
    lengths = torch.tensor([8192, 17, 4000, 5, 8191, 300, 6000, 128], dtype=torch.int32, device="cuda")
    positions = Positions(q_offset=lengths - 4, kv_lengths=lengths)
    plan = plan_attention(
        None, None, 4, L, 1 / math.sqrt(E), KernelOptions(BACKEND="TRITON"), q.device, q.dtype
    )
    plan.forward(q, k, v, positions=positions)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _, _ = plan.forward(q, k, v, positions=positions)
    q.normal_(), k.normal_(), v.normal_()
    lengths.copy_(torch.tensor([100, 8192, 5, 4000, 17, 8191, 128, 300], dtype=torch.int32))
    positions.q_offset.copy_(lengths - 4)
    graph.replay()
    eager, _, _ = plan.forward(q, k, v, positions=positions)
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)
