"""The fused forward kernel against a float64 dense reference.

On CPU the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, tiny shapes); the tests
marked ``gpu`` run the same checks at real sizes on CUDA.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from flexattn.kernels.forward import flex_forward
from flexattn.kernels.mods import KernelMod
from flexattn.options import KernelOptions

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- hand-written kernel mods (the compiler's ABI: score, b, h, q_idx, kv_idx, ARGS) --
@triton.jit
def _identity(score, b, h, q_idx, kv_idx, ARGS):
    return score


@triton.jit
def _alibi(score, b, h, q_idx, kv_idx, ARGS):
    slopes = ARGS[0]
    return score + tl.load(slopes + h) * (kv_idx - q_idx).to(tl.float32)


@triton.jit
def _allow_all(b, h, q_idx, kv_idx, ARGS):
    return q_idx >= 0


@triton.jit
def _causal(b, h, q_idx, kv_idx, ARGS):
    return q_idx >= kv_idx


@triton.jit
def _per_head_window(b, h, q_idx, kv_idx, ARGS):
    # head h sees keys within 3 * (h + 1) of the query, and batch 1 only even keys
    return (tl.abs(q_idx - kv_idx) <= 3 * (h + 1)) & ((b == 0) | (kv_idx % 2 == 0))


@triton.jit
def _late_rows_only(b, h, q_idx, kv_idx, ARGS):
    # rows q_idx < 5 see nothing at all (fully masked rows)
    return (q_idx >= 5) & (kv_idx <= q_idx)


SCORES = {
    "identity": (lambda s, b, h, q, kv, slopes: s, _identity),
    "alibi": (lambda s, b, h, q, kv, slopes: s + slopes[h] * (kv - q), _alibi),
}
MASKS = {
    "all": (lambda b, h, q, kv: q >= 0, _allow_all),
    "causal": (lambda b, h, q, kv: q >= kv, _causal),
    "window": (
        lambda b, h, q, kv: ((q - kv).abs() <= 3 * (h + 1)) & ((b == 0) | (kv % 2 == 0)),
        _per_head_window,
    ),
    "late": (lambda b, h, q, kv: (q >= 5) & (kv <= q), _late_rows_only),
}


def dense_mask(name: str, B: int, H: int, Lq: int, Lkv: int) -> torch.Tensor:
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(Lq).view(1, 1, Lq, 1)
    kv = torch.arange(Lkv).view(1, 1, 1, Lkv)
    return MASKS[name][0](b, h, q, kv).expand(B, H, Lq, Lkv)


def block_tensors(dense: torch.Tensor, q_block: int, kv_block: int):
    """(num, idx) for partial and full blocks of a dense bool mask (B, H, Lq, Lkv); tails ignored."""
    B, H, Lq, Lkv = dense.shape
    nq, nkv = triton.cdiv(Lq, q_block), triton.cdiv(Lkv, kv_block)
    padded = torch.zeros(B, H, nq * q_block, nkv * kv_block, dtype=torch.bool)
    in_range = torch.zeros_like(padded)
    padded[..., :Lq, :Lkv] = dense
    in_range[..., :Lq, :Lkv] = True
    tiles = padded.view(B, H, nq, q_block, nkv, kv_block)
    any_ = tiles.any(5).any(3)
    full = (tiles | ~in_range.view_as(tiles)).all(5).all(3) & any_

    def ordered(blocks):
        idx = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.int()
        return blocks.sum(-1, dtype=torch.int32), idx

    return ordered(any_ & ~full), ordered(full)


def dense_attention(q, k, v, scale, score_fn, slopes, dense):
    """(out, lse, max) in the inputs' precision, from a materialized score matrix."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    B, H, Lq, Lkv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    qi = torch.arange(Lq).view(1, 1, Lq, 1)
    kvi = torch.arange(Lkv).view(1, 1, 1, Lkv)
    s = (
        (q @ k.transpose(-1, -2)).float() * scale
        if q.dtype != torch.float64
        else q @ k.transpose(-1, -2) * scale
    )
    s = score_fn(s, b, h, qi, kvi, slopes.to(s.dtype))
    s = s.masked_fill(~dense, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p.to(v.dtype) @ v).to(q.dtype), lse, s.amax(-1)


def assert_three_way(actual, gold, eager, k=3.0, floor=1e-5):
    finite = torch.isfinite(gold)
    assert torch.equal(torch.isfinite(actual), finite), "inf pattern differs from the reference"
    err = (actual.double() - gold)[finite].abs().max().item() if finite.any() else 0.0
    ref = (eager.double() - gold)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= k * ref + floor, f"error {err:.3g} > {k} * eager error {ref:.3g} + {floor:g}"


def run_case(
    B, Hq, Hkv, Lq, Lkv, E, Ev, blocks, score, mask, dtype, device, options=None, layout="contiguous"
):
    q_block, kv_block = blocks
    q = torch.randn(B, Hq, Lq, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lkv, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lkv, Ev, dtype=dtype, device=device)
    if layout == "BLHE":  # (B, L, H, E) storage seen through a transpose: strided, no copies
        q = torch.randn(B, Lq, Hq, E, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, Lkv, Hkv, E, dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(B, Lkv, Hkv, Ev + 3, dtype=dtype, device=device).transpose(1, 2)[..., :Ev]
    slopes = torch.rand(Hq, device=device) * 0.5
    dense = dense_mask(mask, B, Hq, Lq, Lkv)
    mask_b = 1 if mask in ("all", "causal", "late") else B
    mask_h = 1 if mask in ("all", "causal", "late") else Hq
    (num, idx), (full_num, full_idx) = block_tensors(dense[:mask_b, :mask_h], q_block, kv_block)
    scale = 0.7 / math.sqrt(E)
    score_args = (slopes,) if score == "alibi" else ()
    out, lse, mx = flex_forward(
        q,
        k,
        v,
        score_mod=KernelMod(SCORES[score][1], score_args),
        mask_mod=KernelMod(MASKS[mask][1], ()),
        kv_num_blocks=num.to(device),
        kv_indices=idx.to(device),
        full_kv_num_blocks=full_num.to(device),
        full_kv_indices=full_idx.to(device),
        q_block=q_block,
        kv_block=kv_block,
        scale=scale,
        options=KernelOptions.from_user(options),
    )
    assert out.shape == (B, Hq, Lq, Ev) and out.dtype == dtype
    assert lse.shape == mx.shape == (B, Hq, Lq) and lse.dtype == mx.dtype == torch.float32
    cpu = [t.cpu() for t in (q, k, v)]
    dense = dense.cpu()
    gold = dense_attention(*[t.double() for t in cpu], scale, SCORES[score][0], slopes.cpu().double(), dense)
    eager = dense_attention(*cpu, scale, SCORES[score][0], slopes.cpu(), dense)
    for actual, g, e in zip((out, lse, mx), gold, eager):
        assert_three_way(actual.cpu(), g, e, floor=1e-5 if dtype == torch.float32 else 1e-3)
    return out, lse, mx


def _id(B, Hq, Hkv, Lq, Lkv, E, Ev, blocks, score, mask, dtype):
    return (
        f"B{B}-Hq{Hq}-Hkv{Hkv}-Lq{Lq}-Lkv{Lkv}-E{E}-Ev{Ev}-blk{blocks[0]}x{blocks[1]}-{score}-{mask}-"
        f"{str(dtype).replace('torch.float', 'fp')}"
    )


CPU_CASES = [
    (1, 2, 2, 17, 17, 16, 16, (16, 16), "identity", "causal", torch.float32),
    (2, 2, 1, 40, 17, 24, 16, (32, 16), "alibi", "all", torch.float16),
    (1, 4, 2, 17, 40, 64, 24, (16, 32), "identity", "window", torch.float16),
    (2, 2, 2, 40, 40, 16, 16, (32, 32), "alibi", "window", torch.float32),
    (1, 1, 1, 1, 40, 16, 16, (16, 32), "identity", "all", torch.float32),
    (1, 2, 2, 40, 1, 24, 24, (16, 16), "identity", "all", torch.float16),
    (1, 2, 1, 40, 40, 16, 16, (32, 16), "identity", "late", torch.float32),
]


@needs_kernels
@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(*c) for c in CPU_CASES])
def test_matches_reference_cpu(case):
    run_case(*case, device="cpu")


@needs_kernels
def test_fully_masked_rows_give_zero_out_and_minus_inf_stats():
    out, lse, mx = run_case(1, 2, 1, 40, 40, 16, 16, (32, 16), "identity", "late", torch.float16, "cpu")
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (lse[:, :, :5] == -math.inf).all() and (mx[:, :, :5] == -math.inf).all()
    assert not out.isnan().any() and not lse.isnan().any()


@needs_kernels
def test_strided_inputs_without_copies():
    run_case(2, 2, 1, 17, 40, 16, 24, (16, 16), "alibi", "causal", torch.float32, "cpu", layout="BLHE")


@needs_kernels
def test_sparse_block_visited_as_several_tiles():
    run_case(
        1,
        2,
        2,
        40,
        40,
        16,
        16,
        (32, 32),
        "identity",
        "causal",
        torch.float32,
        "cpu",
        options={"BLOCK_M": 16, "BLOCK_N": 16},
    )


@pytest.mark.parametrize(
    "options, blocks, message",
    [
        ({"BLOCK_M": 64}, (32, 32), "must divide the BlockMask's Q_BLOCK=32"),
        ({"BLOCK_N": 32}, (32, 16), "must divide the BlockMask's KV_BLOCK=16"),
        ({}, (24, 32), "multiples of 16"),
    ],
    ids=["BLOCK_M-too-big", "BLOCK_N-too-big", "Q_BLOCK-24"],
)
def test_impossible_tiles_raise_clear_errors(options, blocks, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 1, 32, 16)
    num = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        flex_forward(
            q,
            q,
            q,
            score_mod=KernelMod(_identity, ()),
            mask_mod=KernelMod(_allow_all, ()),
            kv_num_blocks=num,
            kv_indices=idx,
            full_kv_num_blocks=None,
            full_kv_indices=None,
            q_block=blocks[0],
            kv_block=blocks[1],
            scale=1.0,
            options=KernelOptions.from_user(options),
        )


GPU_CASES = [
    (2, 4, 4, 1000, 1000, 64, 64, (128, 128), "alibi", "causal", torch.bfloat16),
    (1, 8, 2, 1537, 2100, 128, 128, (128, 128), "identity", "window", torch.float16),
    (2, 4, 4, 1024, 1024, 256, 256, (128, 128), "identity", "causal", torch.bfloat16),
    (1, 4, 1, 700, 1300, 80, 96, (64, 256), "alibi", "all", torch.float16),
    (1, 2, 2, 513, 1000, 192, 192, (32, 64), "identity", "late", torch.bfloat16),
    (1, 2, 2, 300, 300, 32, 32, (16, 16), "alibi", "window", torch.float32),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[_id(*c) for c in GPU_CASES])
def test_matches_reference_gpu(case):
    run_case(*case, device="cuda")


@gpu
@needs_cuda
def test_strided_inputs_gpu():
    run_case(2, 4, 2, 1000, 777, 64, 64, (128, 128), "alibi", "causal", torch.bfloat16, "cuda", layout="BLHE")


@gpu
@needs_cuda
def test_new_lengths_reuse_the_compiled_kernel():
    from flexattn.kernels.forward import _flex_forward_kernel

    def compiled_kernels() -> int:  # triton's per-device cache: {specialization key: compiled kernel}
        return len(_flex_forward_kernel.device_caches[torch.cuda.current_device()][0])

    run_case(1, 2, 2, 256, 256, 64, 64, (128, 128), "identity", "causal", torch.float16, "cuda")
    before = compiled_kernels()
    for length in (384, 512, 640):  # no kv tail at any of these lengths: the same specialization
        run_case(1, 2, 2, length, length, 64, 64, (128, 128), "identity", "causal", torch.float16, "cuda")
    assert compiled_kernels() == before


TMA_CASES = [
    (2, 8, 2, 1000, 1500, 80, 80, (128, 128), "alibi", "window", torch.bfloat16),
    (1, 4, 4, 777, 777, 128, 64, (128, 128), "identity", "causal", torch.float16),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", TMA_CASES, ids=[_id(*c) for c in TMA_CASES])
def test_tensor_descriptor_loads_gpu(case):
    run_case(*case, device="cuda", options={"USE_TMA": True})
