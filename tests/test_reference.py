"""The reference backend against independent dense float64 attention.

Two independent oracles: (1) mods evaluated one element at a time with plain 0-dim tensors (no vmap,
no chunking) for every catalog entry, gradients included; (2) vectorised dense attention for odd
shapes, head dims 16..256, GQA and Lq != Lkv, compared three ways. Plus fully masked rows, block-mask
semantics (listed / partial / full blocks), the eager-dtype leg, and bounded memory.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flexattn import BlockMask, create_block_mask
from flexattn.reference import reference_attention
from tests.catalog import CATALOG
from tests.helpers import DTYPE_IDS, Shape, assert_close_to_gold, make_qkv

I32 = torch.int32


def per_element_dense(q, k, v, score_mod, mask_mod, scale=None):
    """Dense attention with mods called once per (b, h, i, j) on 0-dim tensors. Small sizes only."""
    B, Hq, Lq, E = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(E) if scale is None else scale
    k_rep = k.repeat_interleave(Hq // Hkv, dim=1)
    v_rep = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k_rep.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lkv)
    rows = []
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                for j in range(Lkv):
                    idx = (torch.tensor(b, dtype=I32), torch.tensor(h, dtype=I32))
                    idx += (torch.tensor(i, dtype=I32), torch.tensor(j, dtype=I32))
                    value = s[b, h, i, j] if score_mod is None else score_mod(s[b, h, i, j], *idx)
                    if mask_mod is not None and not bool(mask_mod(*idx)):
                        value = torch.full((), -math.inf, dtype=s.dtype)
                    rows.append(value.to(s.dtype))
    s = torch.stack(rows).reshape(B, Hq, Lq, Lkv)
    return dense_softmax_attention(s, v_rep)


def dense_softmax_attention(s, v):
    """softmax(s) @ v and logsumexp(s) with fully masked rows giving out 0, lse -inf."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse).unsqueeze(-1))
    return p @ v, lse


def dense_attention(q, k, v, *, causal=False, alibi=False, scale=None):
    """Vectorised dense attention in the inputs' dtype, for simple broadcastable mods."""
    B, Hq, Lq, E = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(E) if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(Lkv).view(1, Lkv)
    if alibi:
        slopes = torch.arange(1, Hq + 1, dtype=s.dtype).view(Hq, 1, 1) / Hq
        s = s - slopes * (i - j).abs()
    if causal:
        s = s.masked_fill(i < j, -math.inf)
    out, lse = dense_softmax_attention(s, v)
    return out.to(q.dtype), lse


def alibi_mod(Hq):
    def alibi(score, b, h, q_idx, kv_idx):
        return score - (h + 1) / Hq * (q_idx - kv_idx).abs()

    return alibi


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# ---- every catalog entry against per-element evaluation ------------------------------------------


@pytest.mark.parametrize("entry", list(CATALOG), ids=list(CATALOG))
def test_catalog_entry_matches_per_element_dense(entry):
    B, H, Lq, Lkv, E = 2, 2, 9, 13, 8
    mods = CATALOG[entry](B, H, Lq, Lkv, "cpu")
    params = [p.requires_grad_() for p in mods.params]  # fp32 captures
    q, k, v = make_qkv(Shape(B=B, Hq=H, Lq=Lq, Lkv=Lkv, E=E), torch.float64, requires_grad=True)
    mask = None
    if mods.mask_mod is not None:
        mask = create_block_mask(mods.mask_mod, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=(4, 4))
    out, lse, _ = reference_attention(q, k, v, mods.score_mod, mask)
    want_out, want_lse = per_element_dense(q, k, v, mods.score_mod, mods.mask_mod)

    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    leaves = [q, k, v, *params]
    got = torch.autograd.grad((out * dout).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((want_out * dout).sum(), leaves, allow_unused=True)
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]
    for name, g, w, leaf in zip(names, got, want, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        assert not bool(torch.isnan(g).any()), f"{name} has NaN"
        # fp32 captures: per_element_dense's autograd adds their gradient up in fp32, one term per
        # (b, h, i, j) that reads them (234 for "captured-scalar", cancelling across softmax rows),
        # off by up to 1.2e-5 over 1000 seeds (the reference's fp64 sum: 5e-7), so 1e-6 failed
        # about one seed in 25.
        rtol, atol = (1e-9, 1e-9) if leaf.dtype == torch.float64 else (1e-6, 1e-4)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---- shapes, three ways ---------------------------------------------------------------------------

SHAPES = [
    Shape(B=1, Hq=1, Lq=1, E=16),
    Shape(B=2, Hq=3, Lq=17, E=32),
    Shape(B=1, Hq=4, Hkv=2, Lq=97, Lkv=130, E=64, Ev=32),
    Shape(B=1, Hq=8, Hkv=1, Lq=5, Lkv=1100, E=16),
    Shape(B=1, Hq=2, Lq=1000, Lkv=1031, E=128),
    Shape(B=1, Hq=1, Lq=33, E=256, Ev=48),
]
CASES = [(s, torch.float32) for s in SHAPES] + [(SHAPES[2], torch.float16), (SHAPES[1], torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s.id}-{DTYPE_IDS[d]}" for s, d in CASES])
@pytest.mark.parametrize("variant", ["noop", "causal-alibi"])
def test_shapes_three_way_forward_and_grads(shape, dtype, variant):
    q, k, v = make_qkv(shape, dtype, requires_grad=True)
    flags = dict(causal=variant != "noop", alibi=variant != "noop")
    score_mod = alibi_mod(shape.Hq) if flags["alibi"] else None
    mask = None
    if flags["causal"]:
        mask = create_block_mask(causal, None, None, shape.Lq, shape.lkv, device="cpu")
    out, lse, _ = reference_attention(q, k, v, score_mod, mask)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))

    def dense_run(cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o, l = dense_attention(*leaves, **flags)
        return o, l, torch.autograd.grad((o * dout.to(cast)).sum(), leaves)

    gold, eager = dense_run(torch.float64), dense_run(dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_gold(out, gold[0], eager[0], name="out")
    assert_close_to_gold(lse, gold[1], eager[1].float(), name="lse")
    for name, g, gg, ge in zip(("dq", "dk", "dv"), grads, gold[2], eager[2]):
        assert_close_to_gold(g, gg, ge, name=name)


def test_custom_scale_matches_dense():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=19, Lkv=23, E=16), torch.float64)
    out, lse, _ = reference_attention(q, k, v, scale=-0.37)
    want_out, want_lse = dense_attention(q, k, v, scale=-0.37)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_max_scores_is_rowwise_max_of_modded_masked_scores():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=11, Lkv=11, E=8), torch.float64)
    mask = create_block_mask(causal, None, None, 11, 11, device="cpu", BLOCK_SIZE=4)
    _, _, max_scores = reference_attention(q, k, v, lambda s, b, h, i, j: 2 * s, mask)
    s = 2 * (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(max_scores, s.amax(-1))


# ---- fully masked rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_fully_masked_rows_give_zero_out_neg_inf_lse_and_finite_grads(dtype):
    Lq, Lkv = 21, 17

    def late_rows(b, h, q_idx, kv_idx):
        return (q_idx >= 8) & (kv_idx <= q_idx)

    bias = torch.zeros(Lq, dtype=torch.float32, requires_grad=True)
    mask = create_block_mask(late_rows, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=4)
    q, k, v = make_qkv(Shape(B=2, Hq=2, Lq=Lq, Lkv=Lkv, E=8), dtype, requires_grad=True)
    out, lse, max_scores = reference_attention(q, k, v, lambda s, b, h, i, j: s + bias[i], mask)
    (out.float().sum() + lse[..., 8:].sum()).backward()

    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    assert bool((lse[:, :, :8] == -math.inf).all()) and bool(torch.isfinite(lse[:, :, 8:]).all())
    assert bool((max_scores[:, :, :8] == -math.inf).all())
    for t in (q, k, v, bias):
        assert bool(torch.isfinite(t.grad).all())
    assert torch.equal(q.grad[:, :, :8], torch.zeros_like(q.grad[:, :, :8]))
    assert torch.equal(bias.grad[:8], torch.zeros(8))


def test_score_mod_returning_neg_inf_everywhere_behaves_like_masked_row():
    q, k, v = make_qkv(Shape(B=1, Hq=1, Lq=6, E=8), torch.float64, requires_grad=True)
    out, lse, _ = reference_attention(q, k, v, lambda s, b, h, i, j: torch.where(i < 3, -math.inf, s))
    out.sum().backward()
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 8, dtype=torch.float64))
    assert bool((lse[0, 0, :3] == -math.inf).all())
    assert bool(torch.isfinite(q.grad).all()) and bool(torch.isfinite(k.grad).all())


# ---- block-mask semantics ----------------------------------------------------------------------------


def test_block_lists_decide_visits_and_mask_mod_runs_only_on_partial_blocks():
    # 3 q blocks x 3 kv blocks of 4: row 0 lists kv block 0 as partial; row 1 lists kv block 1 as
    # full (mask_mod says False there, but full blocks skip it); row 2 lists nothing (fully masked).
    Lq = Lkv = 12
    num = torch.tensor([[[1, 0, 0]]], dtype=I32)
    idx = torch.tensor([[[[0, 0, 0], [0, 0, 0], [0, 0, 0]]]], dtype=I32)
    full_num = torch.tensor([[[0, 1, 0]]], dtype=I32)
    full_idx = torch.tensor([[[[0, 0, 0], [1, 0, 0], [0, 0, 0]]]], dtype=I32)
    mask = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=4, mask_mod=causal)
    q, k, v = make_qkv(Shape(B=1, Hq=1, Lq=Lq, E=8), torch.float64)
    out, lse, _ = reference_attention(q, k, v, None, mask)

    allowed = torch.zeros(Lq, Lkv, dtype=torch.bool)
    allowed[:4, :4] = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed[4:8, 4:8] = True
    s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, -math.inf)
    want_out, want_lse = dense_softmax_attention(s, v)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_chunking_does_not_change_results():
    mods = CATALOG["interval-gather-then-index"](1, 2, 40, 40, "cpu")
    mask = create_block_mask(mods.mask_mod, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=8)
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=40, E=8), torch.float64)
    whole = reference_attention(q, k, v, None, mask, chunk_elements=1 << 20)
    tiny = reference_attention(q, k, v, None, mask, chunk_elements=1)  # one query row per chunk
    for a, b in zip(whole, tiny):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_eager_leg_computes_in_the_input_dtype():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=64, E=32), torch.float16)
    fp32_compute, _, _ = reference_attention(q, k, v)
    fp16_compute, _, _ = reference_attention(q, k, v, compute_dtype=torch.float16)
    dense16, _ = dense_attention(q, k, v)
    gold, _ = dense_attention(q.double(), k.double(), v.double())
    assert fp16_compute.dtype == torch.float16
    assert not torch.equal(fp32_compute, fp16_compute)
    assert (fp32_compute.double() - gold).abs().max() < (fp16_compute.double() - gold).abs().max()
    torch.testing.assert_close(fp16_compute, dense16, rtol=2e-2, atol=2e-2)


# ---- memory ------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from flexattn import create_block_mask
    from flexattn.reference import reference_attention
    torch.manual_seed(0)
    H, L, E = 2, 4096, 32
    q, k, v = (torch.randn(1, H, L, E, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2 * L, requires_grad=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cpu")
    out, lse, _ = reference_attention(q, k, v, lambda s, b, h, i, j: s + bias[i - j + L], mask)
    out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert bias.grad.abs().sum() > 0
    print((after - before) // 1024)
    """
)


def test_forward_and_backward_memory_stays_bounded():
    # One dense fp32 (H, L, L) matrix is 134 MB: holding even one fails the bound.
    # A fixed mmap threshold makes glibc return freed chunks to the OS, so peak RSS measures what
    # the algorithm holds rather than heap fragmentation.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    grown_mb = int(result.stdout.split()[-1])
    assert grown_mb < 120, f"peak RSS grew by {grown_mb} MB"
