"""The backward kernels against float64 autograd of a dense reference (three-way comparison).

Hand-written kernel mods (the compiler's ABI, including the score-gradient functions) keep these
tests independent of the mod compiler. On CPU the kernels run through Triton's interpreter with
tiny shapes; the ``gpu`` tests repeat the checks at real sizes and in bf16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn.block_mask import create_block_mask
from flexattn.kernels.backward import flex_backward
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.mods import KernelMod
from flexattn.options import KernelOptions

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- hand-written kernel mods and their gradients (ABI: see flexattn/kernels/mods.py) ------------
@triton.jit
def _identity(score, b, h, q_idx, kv_idx, ARGS):
    return score


@triton.jit
def _identity_grad(score, b, h, q_idx, kv_idx, dout, ARGS, GRAD_ARGS):
    return dout


@triton.jit
def _softcap(score, b, h, q_idx, kv_idx, ARGS):
    cap = ARGS[0]
    return cap * (2.0 * tl.sigmoid(2.0 * score / cap) - 1.0)


@triton.jit
def _softcap_grad(score, b, h, q_idx, kv_idx, dout, ARGS, GRAD_ARGS):
    t = 2.0 * tl.sigmoid(2.0 * score / ARGS[0]) - 1.0
    return dout * (1.0 - t * t)


@triton.jit
def _rel_bias(score, b, h, q_idx, kv_idx, ARGS):
    # ARGS = (table (H, Q_LEN + KV_LEN - 1), row stride, KV_LEN - 1)
    return score + tl.load(ARGS[0] + h * ARGS[1] + (q_idx - kv_idx + ARGS[2]))


@triton.jit
def _rel_bias_grad(score, b, h, q_idx, kv_idx, dout, ARGS, GRAD_ARGS):
    if len(GRAD_ARGS) > 0:  # () means: return dscore only, write no capture gradients
        tl.atomic_add(GRAD_ARGS[0] + h * ARGS[1] + (q_idx - kv_idx + ARGS[2]), dout)
    return dout


@triton.jit
def _allow_all(b, h, q_idx, kv_idx, ARGS):
    return q_idx >= 0


@triton.jit
def _causal(b, h, q_idx, kv_idx, ARGS):
    return q_idx >= kv_idx


@triton.jit
def _per_head_window(b, h, q_idx, kv_idx, ARGS):
    return (tl.abs(q_idx - kv_idx) <= 3 * (h + 1)) & ((b == 0) | (kv_idx % 2 == 0))


@triton.jit
def _late_rows_only(b, h, q_idx, kv_idx, ARGS):
    return (q_idx >= 5) & (kv_idx <= q_idx)


def _torch_rel_bias(s, b, h, q, kv, table):
    return s + table[h, q - kv + s.shape[-1] - 1]


SCORES = {  # name -> (torch twin, kernel fn, kernel grad fn, learnable table?)
    "identity": (lambda s, b, h, q, kv, table: s, _identity, _identity_grad, False),
    "softcap": (lambda s, b, h, q, kv, table: 4.0 * torch.tanh(s / 4.0), _softcap, _softcap_grad, False),
    "relbias": (_torch_rel_bias, _rel_bias, _rel_bias_grad, True),
}
MASKS = {  # name -> (torch mask_mod, kernel fn, depends on (b, h)?)
    "all": (lambda b, h, q, kv: q >= 0, _allow_all, False),
    "causal": (lambda b, h, q, kv: q >= kv, _causal, False),
    "window": (
        lambda b, h, q, kv: ((q - kv).abs() <= 3 * (h + 1)) & ((b == 0) | (kv % 2 == 0)),
        _per_head_window,
        True,
    ),
    "late": (lambda b, h, q, kv: (q >= 5) & (kv <= q), _late_rows_only, False),
}


def _kernel_score_mod(name: str, table: torch.Tensor, kv_len: int) -> KernelMod:
    _, fn, grad_fn, learnable = SCORES[name]
    if name == "softcap":
        return KernelMod(fn, (4.0,), grad_fn)
    if not learnable:
        return KernelMod(fn, (), grad_fn)
    args = (table, table.stride(0), kv_len - 1)
    return KernelMod(fn, args, grad_fn, (table,), lambda buffers: (buffers[0],))


def _index_grid(B, H, Lq, Lkv):
    """(b, h, q_idx, kv_idx) index tensors that broadcast to (B, H, Lq, Lkv)."""
    return (
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(Lq).view(1, 1, Lq, 1),
        torch.arange(Lkv).view(1, 1, 1, Lkv),
    )


def _attention(q, k, v, scale, score, table, dense):
    """(out, lse) of the dense math; scores in fp32 (fp64 for fp64 inputs), like the kernels."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    b, h, qi, kvi = _index_grid(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q @ k.transpose(-1, -2)).to(acc) * scale
    s = SCORES[score][0](s, b, h, qi, kvi, table.to(acc))
    s = s.masked_fill(~dense, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return (p.to(v.dtype) @ v).to(q.dtype), lse


def _grads(q, k, v, table, scale, score, dense, dout, dlse):
    """Autograd gradients of sum(out * dout) + sum(lse * dlse) (empty rows excluded)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, table)]
    out, lse = _attention(*leaves[:3], scale, score, leaves[3], dense)
    loss = (out.to(dout.dtype) * dout).sum() + torch.where(lse.isinf(), 0.0, lse * dlse).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return out.detach(), lse.detach(), grads


def assert_three_way(name, actual, gold, eager, k=3.0, floor=1e-5):
    assert not actual.isnan().any(), f"NaN in {name}"
    err = (actual.double() - gold).abs().max().item()
    ref = (eager.double() - gold).abs().max().item()
    assert err <= k * ref + floor * max(1.0, gold.abs().max().item()), (
        f"{name}: error {err:.3g} > {k} * eager error {ref:.3g} + floor {floor:g}"
    )


def run_case(
    B, Hq, Hkv, Lq, Lkv, E, Ev, blocks, score, mask, dtype, device, with_dlse=True, options=None, dq_mode=None
):
    """Gradients from flex_backward, checked three-way; returns (dq, dk, dv, dtable)."""
    q = torch.randn(B, Hq, Lq, E, device=device).to(dtype)
    k = torch.randn(B, Hkv, Lkv, E, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lkv, Ev, device=device).to(dtype)
    dout = torch.randn(B, Hq, Lq, Ev, device=device).to(dtype)
    dlse = torch.randn(B, Hq, Lq, device=device) if with_dlse else None
    table = torch.randn(Hq, Lq + Lkv - 1, device=device)
    scale = 0.7 / math.sqrt(E)
    mask_mod, mask_fn, per_bh = MASKS[mask]
    block_mask = create_block_mask(
        mask_mod, B if per_bh else None, Hq if per_bh else None, Lq, Lkv, device=device, BLOCK_SIZE=blocks
    )
    dense = mask_mod(*_index_grid(B, Hq, Lq, Lkv))

    cpu = [t.cpu() for t in (q, k, v, table)]
    dlse_cpu = dlse.cpu() if with_dlse else torch.zeros(B, Hq, Lq)
    _, _, gold = _grads(
        *[t.double() for t in cpu], scale, score, dense, dout.cpu().double(), dlse_cpu.double()
    )
    out, lse, eager = _grads(*cpu, scale, score, dense, dout.cpu(), dlse_cpu)

    grad_table = torch.zeros_like(table)
    kernel_table = table.contiguous()
    dq, dk, dv = flex_backward(
        q,
        k,
        v,
        out.to(device),
        lse.to(device),
        dout,
        dlse,
        score_mod=_kernel_score_mod(score, kernel_table, Lkv),
        mask_mod=KernelMod(mask_fn, ()),
        tables=block_mask.tables(),
        scale=scale,
        options=KernelOptions.from_user(options),
        grad_buffers=(grad_table,) if SCORES[score][3] else (),
        dq_mode=dq_mode,
    )
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    for name, actual, g, e in zip(("dq", "dk", "dv", "dtable"), (dq, dk, dv, grad_table), gold, eager):
        if name != "dtable" or SCORES[score][3]:
            assert_three_way(name, actual.cpu(), g, e, floor=floor)
    return dq, dk, dv, grad_table


def _id(B, Hq, Hkv, Lq, Lkv, E, Ev, blocks, score, mask, dtype):
    return (
        f"B{B}-Hq{Hq}-Hkv{Hkv}-Lq{Lq}-Lkv{Lkv}-E{E}-Ev{Ev}-blk{blocks[0]}x{blocks[1]}-{score}-{mask}-"
        f"{str(dtype).replace('torch.float', 'fp')}"
    )


CPU_CASES = [
    (1, 2, 2, 17, 17, 16, 16, (16, 16), "identity", "all", torch.float32),
    (2, 4, 2, 40, 33, 16, 32, (16, 16), "relbias", "causal", torch.float16),
    (1, 2, 1, 1, 40, 32, 16, (16, 32), "softcap", "all", torch.float16),
    (2, 2, 2, 40, 40, 32, 32, (32, 16), "softcap", "late", torch.float32),
    (2, 4, 1, 33, 40, 16, 16, (16, 32), "relbias", "window", torch.float16),
]


@needs_kernels
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(*c) for c in CPU_CASES])
def test_gradients_match_float64_cpu(case, dq_mode):
    run_case(*case, device="cpu", dq_mode=dq_mode)


@needs_kernels
@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[4]], ids=[_id(*CPU_CASES[1]), _id(*CPU_CASES[4])])
def test_tensor_descriptor_loads_cpu(case):
    """USE_TMA: Q/dO (dK/dV kernel) and K/V (dQ kernel) through tensor descriptors, tails zero-padded."""
    run_case(*case, device="cpu", options={"USE_TMA": True})


@needs_kernels
def test_fully_masked_rows_get_zero_gradients():
    dq, *_ = run_case(1, 2, 1, 40, 17, 16, 16, (16, 16), "identity", "late", torch.float16, "cpu")
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))


@needs_kernels
def test_sparse_blocks_visited_as_several_tiles():
    tiles = {"bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 16, "bwd_BLOCK_M2": 16, "bwd_BLOCK_N2": 16}
    run_case(1, 2, 2, 40, 40, 16, 16, (32, 32), "relbias", "causal", torch.float32, "cpu", options=tiles)


@needs_kernels
def test_deterministic_gradients_are_reproducible_and_accurate():
    case = (2, 2, 1, 40, 33, 16, 16, (16, 16), "relbias", "causal", torch.float16)
    torch.manual_seed(0)
    first = run_case(*case, device="cpu", options={"deterministic": True})
    torch.manual_seed(0)
    second = run_case(*case, device="cpu", options={"deterministic": True})
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernels
@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2]), Lq=st.integers(1, 50),
    Lkv=st.integers(1, 50), E=st.sampled_from([16, 24, 32]), Ev=st.sampled_from([16, 40]),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32)]), score=st.sampled_from(sorted(SCORES)),
    mask=st.sampled_from(sorted(MASKS)), dtype=st.sampled_from([torch.float32, torch.float16]),
    dq_mode=st.sampled_from(["separate", "atomic"]),
)  # fmt: skip
def test_random_shapes_match_float64(B, Hkv, G, Lq, Lkv, E, Ev, blocks, score, mask, dtype, dq_mode):
    run_case(B, Hkv * G, Hkv, Lq, Lkv, E, Ev, blocks, score, mask, dtype, "cpu", dq_mode=dq_mode)


GPU_CASES = [
    (2, 4, 4, 1000, 1000, 64, 64, (128, 128), "relbias", "causal", torch.bfloat16),
    (1, 8, 2, 1537, 2100, 128, 128, (128, 128), "identity", "window", torch.float16),
    (2, 4, 4, 1024, 1024, 256, 256, (128, 128), "softcap", "causal", torch.bfloat16),
    (1, 4, 1, 700, 1300, 80, 96, (64, 256), "relbias", "all", torch.float16),
    (1, 2, 2, 513, 1000, 192, 192, (32, 64), "identity", "late", torch.bfloat16),
    (1, 2, 2, 300, 300, 32, 32, (16, 16), "softcap", "window", torch.float32),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[_id(*c) for c in GPU_CASES])
def test_gradients_match_float64_gpu(case):
    run_case(*case, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", GPU_CASES[:2], ids=[_id(*c) for c in GPU_CASES[:2]])
def test_every_dq_strategy_gpu(case, dq_mode):
    run_case(*case, device="cuda", dq_mode=dq_mode)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES[:5], ids=[_id(*c) for c in GPU_CASES[:5]])
def test_tensor_descriptor_loads_gpu(case):
    run_case(*case, device="cuda", options={"USE_TMA": True})


@gpu
@needs_cuda
def test_deterministic_gradients_are_bitwise_reproducible_gpu():
    case = (2, 8, 2, 1024, 1024, 64, 64, (128, 128), "relbias", "causal", torch.bfloat16)
    runs = []
    for _ in range(3):
        torch.manual_seed(0)
        runs.append(run_case(*case, device="cuda", options={"deterministic": True})[3])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@gpu
@needs_cuda
def test_new_lengths_reuse_the_compiled_kernels_gpu():
    from flexattn.kernels.backward import _bwd_dkdv, _bwd_dq, _bwd_preprocess

    def compiled() -> int:  # triton's per-device caches: {specialization key: compiled kernel}
        device = torch.cuda.current_device()
        return sum(len(kernel.device_caches[device][0]) for kernel in (_bwd_preprocess, _bwd_dkdv, _bwd_dq))

    run_case(1, 2, 2, 256, 256, 64, 64, (128, 128), "identity", "causal", torch.float16, "cuda")
    before = compiled()
    for length in (384, 512, 640):  # no tails at any of these lengths: the same specialization
        run_case(1, 2, 2, length, length, 64, 64, (128, 128), "identity", "causal", torch.float16, "cuda")
    assert compiled() == before


def _valid_backward_args(L=32, E=16):
    """Arguments of a well-formed flex_backward call (causal mask: partial and full blocks)."""
    q, k, v, out, dout = (torch.randn(1, 2, L, E) for _ in range(5))
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    tables = {name: getattr(mask, name) for name in MASK_TABLES}
    mods = {"score_mod": KernelMod(_identity, (), _identity_grad), "mask_mod": KernelMod(_causal, ())}
    return dict(
        q=q, k=k, v=v, out=out, lse=torch.zeros(1, 2, L), dout=dout, dlse=None, **mods, **tables,
        q_block=16, kv_block=16, scale=1.0, options=KernelOptions(),
    )  # fmt: skip


MASK_TABLES = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip

BAD_BACKWARD_ARGS = {
    # full kv blocks without their transposed view would visit the partial q blocks as full ones
    "full-kv-without-full-q": ({"full_q_num_blocks": None, "full_q_indices": None}, "full_q_num_blocks"),
    "no-q-side-tables": ({"q_num_blocks": None, "q_indices": None}, "q_num_blocks"),
    "q-tables-too-short": (
        {
            "q_num_blocks": torch.zeros(1, 1, 1, dtype=torch.int32),
            "q_indices": torch.zeros(1, 1, 1, 2, dtype=torch.int32),
        },
        "q_num_blocks has 1 kv blocks",
    ),
    "dout-dtype": ({"dout": torch.randn(1, 2, 32, 16).half()}, "dout"),
    "out-shape": ({"out": torch.randn(1, 2, 32, 8)}, "out"),
    "lse-shape": ({"lse": torch.zeros(1, 2, 31)}, "lse"),
    "dlse-shape": ({"dlse": torch.zeros(2, 32)}, "dlse"),
    "grad-buffers-without-captures": ({"grad_buffers": (torch.zeros(3),)}, "grad_buffers"),
    "table-on-another-device": (
        {"q_indices": torch.zeros(1, 1, 2, 2, dtype=torch.int32, device="meta")},
        "meta",
    ),
    "tile-does-not-divide-block": (
        {"options": KernelOptions(bwd_BLOCK_M1=32)},
        "must divide the BlockMask's block size 16",
    ),
}


def _backward(**args):
    """flex_backward with the block lists (named as in MASK_TABLES) gathered into BlockTables."""
    lists = [args.pop(name) for name in MASK_TABLES]
    tables = BlockTables.from_tensors(lists, args.pop("q_block"), args.pop("kv_block"))
    return flex_backward(**args, tables=tables)


@pytest.mark.parametrize("name", sorted(BAD_BACKWARD_ARGS))
def test_inconsistent_arguments_raise_clear_errors(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check; no kernel runs
    changes, message = BAD_BACKWARD_ARGS[name]
    args = {**_valid_backward_args(), **changes}
    with pytest.raises(ValueError, match=message):
        _backward(**args)


@needs_kernels
@pytest.mark.parametrize("options", [KernelOptions(), None], ids=["KernelOptions", "None"])
def test_valid_arguments_pass_the_checks(options):
    dq, dk, dv = _backward(**{**_valid_backward_args(), "options": options})
    assert dq.shape == dk.shape == dv.shape == (1, 2, 32, 16)
