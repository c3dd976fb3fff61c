"""The fused forward kernel (``flex_forward``) against the float64 reference, three ways.

Every case compiles a catalog entry's mods with ``flexattn.compiler``, builds its BlockMask with
``flexattn.create_block_mask`` and compares out, lse and max_scores with the reference backend in
float64 (gold) and in the test dtype (eager). On CPU the kernel runs through Triton's interpreter
(TRITON_INTERPRET=1, tiny shapes, the whole catalog); tests marked ``gpu`` repeat the checks at
real sizes on CUDA, bf16 included.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from flexattn import create_block_mask, noop_mask
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.device import device_limits
from flexattn.kernels.forward import flex_forward
from flexattn.kernels.tiles import forward_tiles
from flexattn.options import KernelOptions
from flexattn.reference import reference_attention
from tests.catalog import CATALOG
from tests.helpers import DTYPE_IDS, Shape, assert_close_to_gold, make_qkv

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)
gpu = pytest.mark.gpu


def default_tiles(shape, dtype, blocks, device, **changes):
    """The launcher's own tile choice for ``shape`` on ``device``, with ``changes`` applied."""
    target = device_limits(torch.device(device))
    tiles = forward_tiles(
        head_dim=shape.E, v_head_dim=shape.ev, dtype=dtype, q_len=shape.Lq, kv_len=shape.lkv,
        q_block=blocks[0], kv_block=blocks[1], capability=target.capability,
        shared_memory_limit=target.shared_memory, options=None,
    )  # fmt: skip
    return replace(tiles, **changes)


def run_forward(
    shape, dtype, entry, blocks, device, options=None, layout="BHLE", mask_dims=(True, True), scale=None,
    tiles=None,
):  # fmt: skip
    """Run flex_forward on fresh inputs and check (out, lse, max_scores) against the reference.
    ``tiles``: an explicit launch configuration (default: the launcher's choice)."""
    q, k, v = make_qkv(shape, dtype, device)
    if layout == "BLHE":  # stored as (B, L, H, E) and seen through a transpose: strided, no copies
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    score_mod, mask_mod = CATALOG[entry](shape.B, shape.Hq, shape.Lq, shape.lkv, device)
    mask = create_block_mask(
        mask_mod or noop_mask,
        shape.B if mask_dims[0] else None,  # None: one mask row broadcast over the batch
        shape.Hq if mask_dims[1] else None,
        shape.Lq,
        shape.lkv,
        device=device,
        BLOCK_SIZE=blocks,
    )
    scale = 0.8 / math.sqrt(shape.E) if scale is None else scale
    out, lse, max_scores = flex_forward(
        q, k, v,
        score_mod=compile_score_mod(score_mod, device=q.device),
        mask_mod=compile_mask_mod(mask_mod, device=q.device), tables=mask.tables(),
        scale=scale, options=KernelOptions.from_user(options), tiles=tiles,
    )  # fmt: skip
    assert out.shape == (shape.B, shape.Hq, shape.Lq, shape.ev) and out.dtype == dtype
    assert lse.shape == max_scores.shape == (shape.B, shape.Hq, shape.Lq)
    assert lse.dtype == max_scores.dtype == torch.float32

    def reference(compute_dtype):
        args = [t.double() if compute_dtype is None else t for t in (q, k, v)]
        return reference_attention(*args, score_mod, mask, scale, compute_dtype=compute_dtype)

    gold, eager = reference(None), reference(dtype)
    for name, actual, g, e in zip(("out", "lse", "max_scores"), (out, lse, max_scores), gold, eager):
        assert_close_to_gold(actual, g, e, name=name)
    return out, lse, max_scores


def _kv_tables(num, idx, q_block, kv_block):
    """Hand-built kv-side block lists (no full blocks, no q side: the forward reads neither)."""
    return BlockTables(num, idx, None, None, None, None, None, None, q_block, kv_block)


# -- CPU (interpreter): every catalog entry once, then shapes, dtypes and mask geometries --

CATALOG_SHAPES = [Shape(B=2, Hq=4, Hkv=2, Lq=40, Lkv=17, E=16), Shape(B=1, Hq=2, Lq=17, Lkv=40, E=24, Ev=16)]


@interpreted
@pytest.mark.parametrize("entry", sorted(CATALOG))
def test_catalog_entry_matches_reference(entry):
    index = sorted(CATALOG).index(entry)  # alternate shapes and dtypes across the catalog
    shape = CATALOG_SHAPES[index % 2]
    dtype = (torch.float32, torch.float16)[index // 2 % 2]
    run_forward(shape, dtype, entry, (16, 16) if index % 3 else (32, 16), "cpu")


CPU_CASES = [
    (Shape(B=1, Hq=1, Lq=1, Lkv=40, E=16), torch.float32, "causal-bottom-right", (16, 32)),
    (Shape(B=1, Hq=2, Lq=40, Lkv=1, E=24), torch.float16, "noop", (16, 16)),
    (Shape(B=2, Hq=2, Lq=40, E=64), torch.float16, "v-alibi-causal", (32, 32)),
    (Shape(B=1, Hq=4, Hkv=1, Lq=33, Lkv=47, E=24, Ev=64), torch.float32, "v-document-causal", (16, 32)),
    (Shape(B=1, Hq=2, Lq=40, E=16), torch.float16, "late-rows-only", (32, 16)),
]


@interpreted
@pytest.mark.parametrize(
    "shape, dtype, entry, blocks",
    CPU_CASES,
    ids=[f"{s.id}-{DTYPE_IDS[d]}-{e}-blk{b[0]}x{b[1]}" for s, d, e, b in CPU_CASES],
)
def test_shapes_and_block_sizes_cpu(shape, dtype, entry, blocks):
    run_forward(shape, dtype, entry, blocks, "cpu")


@interpreted
@pytest.mark.parametrize("entry", ["noop", "causal"])
@pytest.mark.parametrize("scale", [-0.3, 2.0])
def test_identity_score_mod_with_any_scale(entry, scale):
    """Identity score mods keep raw q.k in the softmax when the scale is positive, scale first otherwise."""
    run_forward(Shape(B=1, Hq=2, Lq=40, Lkv=33, E=16), torch.float32, entry, (16, 16), "cpu", scale=scale)


@interpreted
def test_fully_masked_rows_give_zero_out_and_minus_inf_stats():
    out, lse, max_scores = run_forward(
        Shape(B=1, Hq=2, Lq=33, E=16), torch.float16, "constant-false", (16, 16), "cpu"
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == -math.inf).all() and (max_scores == -math.inf).all()


# (mask per batch?, mask per head?) -> a catalog mask that varies along exactly those dims
BROADCAST_MASKS = {(False, False): "v-sliding-window", (True, False): "v-prefix-lm-per-batch",
                   (False, True): "nested-and-or"}  # fmt: skip


@interpreted
@pytest.mark.parametrize("mask_dims", list(BROADCAST_MASKS), ids=["B1-H1", "B-H1", "B1-H"])
def test_mask_broadcast_over_batch_or_heads(mask_dims):
    shape = Shape(B=2, Hq=2, Lq=40, E=16)
    entry = BROADCAST_MASKS[mask_dims]
    run_forward(shape, torch.float32, entry, (16, 16), "cpu", mask_dims=mask_dims)


@interpreted
def test_strided_inputs_without_copies():
    shape = Shape(B=2, Hq=2, Hkv=1, Lq=17, Lkv=40, E=16, Ev=24)
    run_forward(shape, torch.float32, "v-alibi", (16, 16), "cpu", layout="BLHE")


@interpreted
def test_sparse_block_visited_as_several_tiles():
    run_forward(Shape(B=1, Hq=2, Lq=70, E=16), torch.float32, "v-natten-1d", (64, 64), "cpu",
                options={"BLOCK_M": 16, "BLOCK_N": 32})  # fmt: skip


@interpreted
@pytest.mark.parametrize(
    "use_tma, pipeline_qk", [(True, False), (False, True), (True, True)], ids=["tma", "qk-prefetch", "both"]
)
def test_descriptor_loads_and_qk_prefetch(use_tma, pipeline_qk):
    """The Hopper paths (on by default there) run in the interpreter too: force them on."""
    shape = Shape(B=1, Hq=4, Hkv=2, Lq=40, Lkv=33, E=24, Ev=16)
    tiles = default_tiles(shape, torch.float16, (16, 32), "cpu", use_tma=use_tma, pipeline_qk=pipeline_qk)
    run_forward(shape, torch.float16, "v-document-causal", (16, 32), "cpu", tiles=tiles)


@interpreted
@pytest.mark.parametrize("pipeline_qk", [False, True], ids=["plain", "qk-prefetch"])
def test_indices_past_the_count_are_never_read(pipeline_qk):
    """Hand-built tables may hold any value past each row's count (here: far out of range)."""
    shape = Shape(B=1, Hq=2, Lq=32, E=16)
    q, k, v = make_qkv(shape, torch.float16)
    counts = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.int32)  # (B=1, H=2, NQ=2)
    indices = torch.full((1, 2, 2, 2), 1 << 24, dtype=torch.int32)
    indices[0, 0, 1, 0] = indices[0, 1, 0, 0] = 1  # the one listed block of each non-empty row
    out, lse, _ = flex_forward(
        q, k, v, score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(None),
        tables=_kv_tables(counts, indices, 16, 16), scale=1.0,
        tiles=default_tiles(shape, torch.float16, (16, 16), "cpu", use_tma=False, pipeline_qk=pipeline_qk),
    )  # fmt: skip
    empty = [(0, slice(0, 16)), (1, slice(16, 32))]  # (head, rows) with no listed block
    for h, rows in empty:
        assert torch.all(out[0, h, rows] == 0) and torch.all(lse[0, h, rows] == float("-inf"))
    listed = [(0, slice(16, 32)), (1, slice(0, 16))]
    for h, rows in listed:
        scores = q[0, h, rows].float() @ k[0, h, 16:32].float().T
        torch.testing.assert_close(out[0, h, rows].float(), scores.softmax(-1) @ v[0, h, 16:32].float(),
                                   atol=2e-3, rtol=2e-3)  # fmt: skip


@pytest.mark.parametrize("Lq, Lkv", [(0, 33), (33, 0)], ids=["Lq0", "Lkv0"])
def test_empty_sequences(Lq, Lkv, monkeypatch):
    """No queries: empty outputs. No keys: every row is fully masked (out 0, lse = max = -inf)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(Shape(B=2, Hq=2, Lq=Lq, Lkv=Lkv, E=16, Ev=24))
    nq, nkv = -(-Lq // 16), -(-Lkv // 16)
    num, idx = torch.zeros(1, 1, nq, dtype=torch.int32), torch.zeros(1, 1, nq, nkv, dtype=torch.int32)
    out, lse, max_scores = flex_forward(
        q, k, v, score_mod=compile_score_mod(None, device="cpu"),
        mask_mod=compile_mask_mod(None, device="cpu"), tables=_kv_tables(num, idx, 16, 16), scale=1.0,
    )  # fmt: skip
    assert out.shape == (2, 2, Lq, 24) and lse.shape == max_scores.shape == (2, 2, Lq)
    assert torch.equal(out, torch.zeros_like(out))
    assert (lse == -math.inf).all() and (max_scores == -math.inf).all()


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
            q, q, q, score_mod=compile_score_mod(None, device="cpu"),
            mask_mod=compile_mask_mod(None, device="cpu"), tables=_kv_tables(num, idx, *blocks),
            scale=1.0, options=KernelOptions.from_user(options),
        )  # fmt: skip


# -- GPU: real sizes, bf16, head dims up to 256 (non-powers of two too), tensor-descriptor loads --

GPU_CASES = [
    (Shape(B=2, Hq=4, Lq=1000, E=64), torch.bfloat16, "v-alibi-causal", (128, 128), None),
    (Shape(B=1, Hq=8, Hkv=2, Lq=1537, Lkv=2100, E=128), torch.float16, "v-document-causal", (128, 128), None),
    (Shape(B=2, Hq=4, Lq=1024, E=256), torch.bfloat16, "v-tanh-softcap", (128, 128), None),
    (
        Shape(B=1, Hq=4, Hkv=1, Lq=700, Lkv=1300, E=80, Ev=96),
        torch.float16,
        "v-t5-relative-bias",
        (64, 256),
        None,
    ),
    (Shape(B=1, Hq=2, Lq=513, Lkv=1000, E=192), torch.bfloat16, "late-rows-only", (32, 64), None),
    (Shape(B=1, Hq=2, Lq=300, E=32), torch.float32, "v-natten-2d", (16, 16), None),
    (
        Shape(B=2, Hq=8, Hkv=2, Lq=1000, Lkv=1500, E=80),
        torch.bfloat16,
        "v-sliding-window",
        (128, 128),
        {"USE_TMA": True},
    ),
    (
        Shape(B=1, Hq=4, Lq=777, E=128, Ev=64),
        torch.float16,
        "softcap-document-causal",
        (128, 128),
        {"USE_TMA": True},
    ),
]


@gpu
@pytest.mark.parametrize(
    "shape, dtype, entry, blocks, options",
    GPU_CASES,
    ids=[f"{s.id}-{DTYPE_IDS[d]}-{e}-blk{b[0]}x{b[1]}{'-tma' if o else ''}" for s, d, e, b, o in GPU_CASES],
)
def test_matches_reference_gpu(shape, dtype, entry, blocks, options):
    run_forward(shape, dtype, entry, blocks, "cuda", options=options)


@gpu
def test_strided_inputs_gpu():
    shape = Shape(B=2, Hq=4, Hkv=2, Lq=1000, Lkv=777, E=64)
    run_forward(shape, torch.bfloat16, "v-alibi-causal", (128, 128), "cuda", layout="BLHE")


@gpu
def test_new_lengths_reuse_the_compiled_kernel():
    from flexattn.kernels.forward import _flex_forward_kernel

    def compiled_kernels() -> int:  # triton's per-device cache: {specialization key: compiled kernel}
        return len(_flex_forward_kernel.device_caches[torch.cuda.current_device()][0])

    run_forward(Shape(B=1, Hq=2, Lq=256, E=64), torch.float16, "causal", (128, 128), "cuda")
    before = compiled_kernels()
    for length in (384, 512, 640):  # no kv tail at any of these lengths: the same specialization
        run_forward(Shape(B=1, Hq=2, Lq=length, E=64), torch.float16, "causal", (128, 128), "cuda")
    assert compiled_kernels() == before


@gpu
@pytest.mark.parametrize("pipeline_qk", [False, True], ids=["plain", "qk-prefetch"])
def test_pointer_loads_gpu(pipeline_qk):
    """The non-TMA path (used for strides TMA cannot take) at real size, with and without prefetch."""
    shape = Shape(B=2, Hq=8, Hkv=2, Lq=1100, Lkv=900, E=96)
    tiles = default_tiles(shape, torch.bfloat16, (128, 128), "cuda", use_tma=False, pipeline_qk=pipeline_qk)
    run_forward(shape, torch.bfloat16, "v-document-causal", (128, 128), "cuda", tiles=tiles)


@gpu
def test_offsets_beyond_int32_gpu():
    """A batch stride over 2**31 elements: q/k/v are views into one 8.6 GB buffer, the last batch checked."""
    L, E = 256, 64
    rows = (1 << 31) // E + 3 * L  # per batch entry: batch stride > 2**31 elements
    buffer = torch.empty(2, rows, E, device="cuda", dtype=torch.bfloat16)
    for part in range(3):
        buffer[:, rows - (part + 1) * L : rows - part * L].normal_()
    q, k, v = (buffer[:, rows - (i + 1) * L : rows - i * L].unsqueeze(1) for i in range(3))  # (2, 1, L, E)
    assert q.stride(0) > 2**31
    mask = create_block_mask(noop_mask, None, None, L, L, device="cuda")
    identity, everything = compile_score_mod(None, device=q.device), compile_mask_mod(None, device=q.device)
    out, lse, _ = flex_forward(
        q, k, v, score_mod=identity, mask_mod=everything, tables=mask.tables(), scale=E**-0.5,
    )  # fmt: skip
    last = [t[1:].contiguous() for t in (q, k, v)]
    gold = reference_attention(*[t.double() for t in last], None, mask, E**-0.5)
    eager = reference_attention(*last, None, mask, E**-0.5, compute_dtype=torch.bfloat16)
    assert_close_to_gold(out[1:], gold[0], eager[0], name="out")
    assert_close_to_gold(lse[1:], gold[1], eager[1], name="lse")


@gpu
def test_autotune_picks_and_caches_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    shape = Shape(B=1, Hq=4, Lq=1000, E=64)
    run_forward(shape, torch.float16, "v-sliding-window", (64, 64), "cuda", options={"autotune": True})
    assert (tmp_path / "forward.json").exists()
    run_forward(shape, torch.float16, "v-sliding-window", (64, 64), "cuda", options={"autotune": True})
