"""``flex_attention(..., positions=Positions(...))``: decoding and chunked prefill on every backend.

The same call on the reference backend and on the Triton kernels (interpreter) gives the same
answer, both equal to the reference over the whole sequence; bad positions raise the same clear
error on every backend.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import Positions, create_block_mask, flex_attention
from flexattn.options import KernelOptions
from flexattn.plan import plan_attention
from tests.helpers import assert_close_to_gold

BACKENDS = [
    "REFERENCE",
    pytest.param(
        "TRITON",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1",
            reason="CPU kernel tests run through TRITON_INTERPRET=1",
        ),
    ),
]

B, HQ, HKV, E, L = 2, 4, 2, 16, 45


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _inputs(lq):
    return torch.randn(B, HQ, lq, E), torch.randn(B, HKV, L, E), torch.randn(B, HKV, L, E)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [1, 7], ids=lambda n: f"Lq{n}")
def test_chunk_at_an_offset_equals_the_whole_sequence(backend, lq):
    """Query rows [offset, offset + lq) of a causal + ALiBi sequence, per-batch offsets and lengths."""
    q, k, v = _inputs(lq)
    slopes = torch.rand(HQ)

    def alibi(s, b, h, i, j):
        return s + slopes[h] * (j - i)

    mask = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    offsets = torch.tensor([L - lq, 20], dtype=torch.int32)
    lengths = torch.tensor([L, 20 + lq], dtype=torch.int32)
    positions = Positions(q_offset=offsets, kv_lengths=lengths)
    out, lse = flex_attention(
        q,
        k,
        v,
        alibi,
        mask,
        enable_gqa=True,
        return_lse=True,
        positions=positions,
        kernel_options={"BACKEND": backend},
    )
    for b in range(B):
        n, off = int(lengths[b]), int(offsets[b])
        whole = torch.zeros(1, HQ, n, E)
        whole[:, :, off : off + lq] = q[b : b + 1]
        mask_b = create_block_mask(_causal, None, None, n, n, device="cpu", BLOCK_SIZE=16)
        kb, vb = k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        gold = flex_attention(
            whole.double(), kb.double(), vb.double(), alibi, mask_b, enable_gqa=True, return_lse=True
        )
        eager = flex_attention(whole, kb, vb, alibi, mask_b, enable_gqa=True, return_lse=True)
        rows = slice(off, off + lq)
        assert_close_to_gold(out[b : b + 1], gold[0][:, :, rows], eager[0][:, :, rows], name=f"out b{b}")
        assert_close_to_gold(lse[b : b + 1], gold[1][:, :, rows], eager[1][:, :, rows], name=f"lse b{b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mask_with_an_int_offset(backend):
    """Without a block mask every existing key is attended; the score_mod sees absolute positions."""
    q, k, v = _inputs(3)

    def relative(s, b, h, i, j):
        return s - 0.1 * (i - j).abs()

    lengths = torch.tensor([L, 30], dtype=torch.int32)
    positions = Positions(q_offset=27, kv_lengths=lengths)
    out = flex_attention(
        q, k, v, relative, enable_gqa=True, positions=positions, kernel_options={"BACKEND": backend}
    )
    for b in range(B):
        n = int(lengths[b])
        whole = torch.zeros(1, HQ, 30, E)
        whole[:, :, 27:30] = q[b : b + 1]
        kb, vb = k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        gold = flex_attention(whole.double(), kb.double(), vb.double(), relative, enable_gqa=True)
        eager = flex_attention(whole, kb, vb, relative, enable_gqa=True)
        assert_close_to_gold(out[b : b + 1], gold[:, :, 27:30], eager[:, :, 27:30], name=f"out b{b}")


def _bad(message, positions, mask=False, lq=2, **kwargs):
    return pytest.param(positions, mask, lq, kwargs, message, id=message.split()[0].strip("(:.,"))


BAD = [
    _bad("q_offset must be an int >= 0", lambda: Positions(q_offset=-1)),
    _bad("offsets must be >= 0", lambda: Positions(q_offset=torch.tensor([3, -1], dtype=torch.int32))),
    _bad("int32 tensor of shape (2,)", lambda: Positions(q_offset=torch.tensor([3, 1]))),
    _bad("(one per sequence)", lambda: Positions(kv_lengths=torch.tensor([3], dtype=torch.int32))),
    _bad("must lie in [0, 45]", lambda: Positions(kv_lengths=torch.tensor([3, 46], dtype=torch.int32))),
    _bad("kv_offset=4 is not supported", lambda: Positions(kv_offset=4)),
    _bad("Q_LEN >= 46", lambda: Positions(q_offset=44), mask=True),
    _bad("flexattn.Positions", lambda: (3, None)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make, mask, lq, kwargs, message", BAD)
def test_bad_positions_raise_clear_errors(backend, make, mask, lq, kwargs, message):
    q, k, v = _inputs(lq)
    block_mask = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=16) if mask else None
    with pytest.raises((ValueError, TypeError), match=f"(?i){_escape(message)}"):
        flex_attention(
            q,
            k,
            v,
            block_mask=block_mask,
            enable_gqa=True,
            positions=make(),
            kernel_options={"BACKEND": backend},
            **kwargs,
        )


def _escape(text):
    import re

    return re.escape(text)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_positions_with_gradients_raise_on_the_kernels():
    q, k, v = _inputs(2)
    q.requires_grad_()
    with pytest.raises(ValueError, match="positions are for inference"):
        flex_attention(
            q, k, v, enable_gqa=True, positions=Positions(q_offset=3), kernel_options={"BACKEND": "TRITON"}
        )


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_prefill_tiles_with_positions_raise():
    q, k, v = _inputs(2)
    with pytest.raises(ValueError, match="kernel_options BLOCK_M configure the prefill kernel"):
        flex_attention(
            q,
            k,
            v,
            enable_gqa=True,
            positions=Positions(q_offset=3),
            kernel_options={"BACKEND": "TRITON", "BLOCK_M": 16},
        )


def test_explain_names_the_forward_kernel():
    q, k, v = _inputs(1)
    plan = plan_attention(None, None, 1, L, 0.25, KernelOptions(BACKEND="TRITON"), torch.device("cpu"))
    assert "forward kernel (inference): decode" in plan.explain(q, k, v)  # a short cache too
    long_k, long_v = (torch.randn(B, k.shape[1], 4096, E) for _ in range(2))  # explain launches nothing
    triton = KernelOptions(BACKEND="TRITON")
    long_plan = plan_attention(None, None, 1, 4096, 0.25, triton, torch.device("cpu"))
    assert "forward kernel (inference): decode" in long_plan.explain(q, long_k, long_v)
    long_q = torch.randn(B, HQ, 65, E)  # 2 heads x 65 tokens: more rows than one tile
    assert "forward kernel (inference): prefill" in long_plan.explain(long_q, long_k, long_v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_per_sequence_mask_with_ragged_lengths_equals_each_sequence_alone(backend):
    """A block mask that differs per sequence (B > 1) with per-sequence query offsets and key
    lengths: each sequence sees its own mask rows, its own keys (the reference backend once took
    every sequence's block rows for sequence 0)."""
    lengths = torch.tensor([19, 40], dtype=torch.int32)
    keep = torch.rand(B, L) > 0.3
    keep[:, 0] = True  # every row keeps a key

    def causal_kept(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & keep[b, kv_idx]

    mask = create_block_mask(causal_kept, B, None, L, L, device="cpu", BLOCK_SIZE=16)
    dtype = torch.float64 if backend == "REFERENCE" else torch.float32  # the kernels take no fp64
    q, k, v = (t.to(dtype) for t in _inputs(1))
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    out = flex_attention(
        q, k, v, block_mask=mask, enable_gqa=True, kernel_options={"BACKEND": backend},
        positions=Positions(q_offset=lengths - 1, kv_lengths=lengths),
    )  # fmt: skip
    for b, n in enumerate(lengths.tolist()):
        kb, vb = (t[b : b + 1, :, :n].repeat_interleave(HQ // HKV, 1) for t in (k, v))
        s = (q[b : b + 1].double() @ kb.double().transpose(-1, -2)) / E**0.5
        s = s.masked_fill(~keep[b, :n], float("-inf"))
        want = (torch.softmax(s, -1) @ vb.double()).to(dtype)
        torch.testing.assert_close(out[b : b + 1], want, rtol=tol, atol=tol)
