"""Gradients through flex_attention on the Triton path: q, k, v, lse and learnable captured tensors.

Every gradient is checked three-way (tests/helpers.py) against float64 autograd of the reference
backend. On CPU the kernels run through Triton's interpreter at tiny shapes; the ``gpu`` tests repeat
the catalog at real sizes and in bf16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn.autograd import FlexAttentionFunction
from flexattn.reference import reference_attention
from tests.catalog import CATALOG
from tests.helpers import (
    DEFAULT_FLOOR,
    DTYPE_IDS,
    Shape,
    assert_close_to_gold,
    gold_and_eager,
    make_qkv,
    reduction_floor,
)

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)
TRITON = {"BACKEND": "TRITON"}

CPU_SHAPES = [
    Shape(B=2, Hq=4, Hkv=2, Lq=40, Lkv=33, E=16, Ev=32),
    Shape(B=1, Hq=2, Lq=17, E=32),
    Shape(B=2, Hq=2, Hkv=1, Lq=1, Lkv=40, E=16),
]
CPU_DTYPES = [torch.float32, torch.float16]


def _mask_for(mask_mod, shape: Shape, device, block: int):
    if mask_mod is None:
        return None
    return create_block_mask(
        mask_mod, shape.B, shape.Hq, shape.Lq, shape.lkv, device=device, BLOCK_SIZE=block
    )


def check_gradients(entry: str, shape: Shape, dtype, device, block: int = 16, options=None):
    """flexattn's gradients for (q, k, v, *learnable params) against gold and eager."""
    mods = CATALOG[entry](shape.B, shape.Hq, shape.Lq, shape.lkv, device)
    params = tuple(p.requires_grad_() for p in mods.params)
    q, k, v = make_qkv(shape, dtype, device, requires_grad=True)
    dout = torch.randn(shape.B, shape.Hq, shape.Lq, shape.ev, device=device).to(dtype)
    block_mask = _mask_for(mods.mask_mod, shape, device, block)
    scale = 0.8 / math.sqrt(shape.E)
    gqa = shape.hkv != shape.Hq
    out = flex_attention(
        q, k, v, mods.score_mod, block_mask, scale, gqa, kernel_options={**TRITON, **(options or {})}
    )
    grads = torch.autograd.grad(out, (q, k, v, *params), dout, allow_unused=True)
    gold, eager = gold_and_eager(
        q, k, v, score_mod=mods.score_mod, block_mask=block_mask, scale=scale, dout=dout, params=params
    )
    names = ("dq", "dk", "dv", *(f"d(param {i})" for i in range(len(params))))
    for name, actual, g, e, leaf in zip(names, grads, gold.grads, eager.grads, (q, k, v, *params)):
        if g is None:  # a captured tensor that does not reach the output differentiably
            assert actual is None or not actual.any(), f"{name}: expected no gradient"
            continue
        assert actual is not None, f"{name}: missing gradient"
        assert actual.dtype == e.dtype, f"{name}: dtype {actual.dtype}, expected {e.dtype}"
        # the floor follows the precision of the computation (a learnable fp32 table still goes
        # through fp16/bf16 matmuls), not the dtype its gradient is returned in
        floor = DEFAULT_FLOOR[dtype]
        if leaf.dim() == 0:  # a 0-dim parameter's gradient is one fp32 sum over every score
            floor = max(floor, reduction_floor(q, k, v, mods.score_mod, block_mask, scale, dout, leaf))
        assert_close_to_gold(actual, g, e, floor=floor, name=name)
    return grads


CPU_CASES = [
    (entry, CPU_SHAPES[i % len(CPU_SHAPES)], CPU_DTYPES[i % len(CPU_DTYPES)])
    for i, entry in enumerate(CATALOG)
]


@needs_kernels
@pytest.mark.parametrize(
    "entry, shape, dtype", CPU_CASES, ids=[f"{e}-{s.id}-{DTYPE_IDS[d]}" for e, s, d in CPU_CASES]
)
def test_catalog_gradients_cpu(entry, shape, dtype):
    check_gradients(entry, shape, dtype, "cpu")


@needs_kernels
@pytest.mark.parametrize("L", [32, 64, 192])
def test_lengths_that_fill_tiles_but_not_mask_blocks(L):
    """L a multiple of the kernels' tiles but not of the 128-wide mask blocks: tail tiles are masked."""
    check_gradients("noop", Shape(B=1, Hq=2, Lq=L, E=16), torch.float32, "cpu", block=128)


@needs_kernels
@pytest.mark.parametrize("use_out", [True, False], ids=["out-and-lse", "lse-only"])
def test_gradients_through_lse(use_out):
    shape = Shape(B=2, Hq=2, Hkv=1, Lq=40, Lkv=33, E=16)
    mods = CATALOG["late-rows-only"](shape.B, shape.Hq, shape.Lq, shape.lkv, "cpu")
    block_mask = _mask_for(mods.mask_mod, shape, "cpu", 16)
    q, k, v = make_qkv(shape, torch.float32, requires_grad=True)
    dout = torch.randn(shape.B, shape.Hq, shape.Lq, shape.ev) if use_out else None
    dlse = torch.randn(shape.B, shape.Hq, shape.Lq)

    def loss(out, lse):
        finite_lse = torch.where(lse.isinf(), 0.0, lse)  # fully masked rows have lse = -inf
        return (finite_lse * dlse).sum() + ((out * dout).sum() if use_out else 0.0)

    out, lse = flex_attention(
        q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, kernel_options=TRITON
    )
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse, _ = reference_attention(*leaves, None, block_mask, None)
        results.append(
            torch.autograd.grad(loss(ref_out, ref_lse), leaves, allow_unused=True, materialize_grads=True)
        )
    for name, actual, g, e in zip(("dq", "dk", "dv"), grads, *results):
        assert_close_to_gold(actual, g, e, name=name)
    assert torch.equal(grads[0][:, :, :5], torch.zeros_like(grads[0][:, :, :5]))  # fully masked rows


@needs_kernels
def test_deterministic_option_gives_identical_bias_gradients():
    shape = Shape(B=2, Hq=2, Lq=40, Lkv=33, E=16)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(
            check_gradients(
                "relative-bias-table", shape, torch.float16, "cpu", options={"deterministic": True}
            )
        )
    assert runs[0][3].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_kernels
def test_inference_saves_nothing_for_backward():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=17, E=16))
    out = flex_attention(q, k, v, kernel_options=TRITON)
    assert out.grad_fn is None
    q.requires_grad_()
    with torch.no_grad():
        assert flex_attention(q, k, v, kernel_options=TRITON).grad_fn is None
    assert (
        flex_attention(q, k, v, kernel_options=TRITON).grad_fn.name()
        == FlexAttentionFunction.__name__ + "Backward"
    )


@needs_kernels
def test_double_backward_raises_a_clear_error():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=17, E=16), requires_grad=True)
    out = flex_attention(q, k, v, kernel_options=TRITON)
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through flex_attention is not supported"):
        dq.sum().backward()


def _relative_bias(table, kv_len):
    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + kv_len - 1]

    return relative_bias


@needs_kernels
def test_learnable_bias_trains_like_the_reference():
    """Five SGD steps on a relative-position bias table: flexattn follows the reference's trajectory."""
    B, H, L, E = 2, 2, 33, 16
    q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
    target = torch.randn(B, H, L, E)
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    init = 0.1 * torch.randn(H, 2 * L - 1)
    trajectories = {}
    for backend in ("TRITON", "REFERENCE"):
        table = init.clone().requires_grad_()
        opt = torch.optim.SGD([table], lr=2.0)

        history = []
        for _ in range(5):
            out = flex_attention(q, k, v, _relative_bias(table, L), mask, kernel_options={"BACKEND": backend})
            loss = ((out - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append((loss.item(), table.detach().clone()))
        trajectories[backend] = history
    moved = (trajectories["REFERENCE"][-1][1] - init).abs().max().item()
    assert moved > 1e-2, "the bias did not train"
    for (loss_t, table_t), (loss_r, table_r) in zip(trajectories["TRITON"], trajectories["REFERENCE"]):
        assert abs(loss_t - loss_r) <= 1e-5 * abs(loss_r)
        assert (table_t - table_r).abs().max().item() <= 1e-4 * moved


GPU_SHAPE = Shape(B=2, Hq=8, Hkv=2, Lq=777, Lkv=1025, E=64)


# A cross-section of the catalog (each entry compiles its own kernels: ~6 s of GPU time apiece).
GPU_ENTRIES = [
    "causal", "v-document-causal", "v-alibi-causal", "v-tanh-softcap", "v-learned-sink",
    "relative-bias-table", "head-query-temperature-causal", "gather-of-gather", "late-rows-only",
    "per-batch-head-window",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("entry", GPU_ENTRIES)
def test_catalog_gradients_gpu(entry):
    check_gradients(entry, GPU_SHAPE, torch.bfloat16, "cuda", block=128)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [16, 128, 256])
def test_head_dims_gpu(E):
    check_gradients("v-alibi-causal", Shape(B=1, Hq=4, Lq=1000, E=E), torch.float16, "cuda", block=128)


@pytest.mark.gpu
def test_deterministic_bias_gradients_gpu():
    shape = Shape(B=2, Hq=8, Lq=1024, E=64)
    runs = []
    for _ in range(3):
        torch.manual_seed(0)
        runs.append(
            check_gradients(
                "relative-bias-table",
                shape,
                torch.bfloat16,
                "cuda",
                block=128,
                options={"deterministic": True},
            )[3]
        )
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.gpu
def test_more_than_65535_batch_heads_gpu():
    """B * Hq above CUDA's grid y limit (65535): the backward launches must still run and be right."""
    check_gradients("noop", Shape(B=4097, Hq=16, Lq=16, E=16), torch.float16, "cuda")


@pytest.mark.gpu
def test_row_offsets_beyond_int32_gpu():
    """position * row stride past 2**31 elements (long sequences in a (B, L, H*E)-like layout).

    q, k, v and dout are column slices of one 4.3 GB buffer whose rows are 2**15 elements apart;
    rows >= 65536 start beyond 2**31 elements. The mask is block diagonal, so the last q/kv blocks
    can be checked against the reference run on just those blocks.
    """
    E, row_stride, block = 16, 1 << 15, 128
    L = (1 << 31) // row_stride + 64
    buffer = torch.zeros(1, L, row_stride, device="cuda", dtype=torch.float16)
    buffer[..., : 4 * E].normal_()
    q, k, v, dout = (buffer[..., i * E : (i + 1) * E].unsqueeze(1) for i in range(4))  # (1, 1, L, E)
    assert q.stride(2) * (L - 1) > 2**31
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def same_block(b, h, q_idx, kv_idx):
        return q_idx // block == kv_idx // block

    mask = create_block_mask(same_block, None, None, L, L, device="cuda", BLOCK_SIZE=block)
    out = flex_attention(q, k, v, block_mask=mask, kernel_options=TRITON)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    start = (L // block - 3) * block  # the last blocks, tail included: independent of the rest
    tail = [t.detach()[:, :, start:].contiguous() for t in (q, k, v, dout)]
    tail_mask = create_block_mask(
        same_block, None, None, L - start, L - start, device="cuda", BLOCK_SIZE=block
    )
    gold, eager = gold_and_eager(*tail[:3], block_mask=tail_mask, dout=tail[3])
    assert_close_to_gold(out[:, :, start:], gold.out, eager.out, name="out")
    for name, actual, g, e in zip(("dq", "dk", "dv"), grads, gold.grads, eager.grads):
        assert_close_to_gold(actual[:, :, start:], g, e, name=name)
