"""create_block_mask's generated kernel (backend="triton"), specified against the torch builder.

Run through Triton's interpreter on CPU (TRITON_INTERPRET=1): both builders must list exactly the
same partial and full blocks, on both sides (kv lists and the transposed q lists), for every mask mod
of the catalog and the attention-gym masks, any block size (square or not), lengths that are not
multiples of the block size, broadcast and per-batch/per-head masks.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn import and_masks, create_block_mask, or_masks
from flexattn import variants as V
from flexattn.block_mask_build import complete_q_side
from flexattn.compiler import codegen_count
from tests.catalog import MASK_MODS
from tests.mask_exprs import make_mod, mask_exprs
from tests.test_block_mask import assert_well_formed

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton builder needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def assert_same_blocks(mask_mod, B, H, Lq, Lkv, block, separate_full=True):
    """The kernel's BlockMask equals the torch builder's, block for block, on both sides."""
    args = (mask_mod, B, H, Lq, Lkv)
    kwargs = dict(device=DEVICE, BLOCK_SIZE=block, separate_full_blocks=separate_full)
    got = create_block_mask(*args, **kwargs, backend="triton")
    got.block_tables = complete_q_side(got.block_tables, builder="triton")  # the q side's kernels too
    want = create_block_mask(*args, **kwargs, backend="torch")
    assert got.shape == want.shape and got.BLOCK_SIZE == want.BLOCK_SIZE and got.mask_mod is mask_mod
    assert torch.equal(got._dense_blocks(full=False), want._dense_blocks(full=False)), "partial blocks differ"
    assert torch.equal(got._dense_blocks(full=True), want._dense_blocks(full=True)), "full blocks differ"
    for name in ("kv_num_blocks", "q_num_blocks", "full_kv_num_blocks", "full_q_num_blocks"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert_well_formed(got.to("cpu"))
    return got


GRIDS = [
    # (B, H, Lq, Lkv, BLOCK_SIZE)
    (2, 2, 37, 53, 16),
    (1, 2, 64, 96, (16, 32)),
    (2, 1, 97, 31, (32, 8)),
]


@pytest.mark.parametrize("grid", GRIDS, ids=[f"B{g[0]}-H{g[1]}-L{g[2]}x{g[3]}-blk{g[4]}" for g in GRIDS])
@pytest.mark.parametrize("entry", list(MASK_MODS), ids=list(MASK_MODS))
def test_catalog_masks_match_the_torch_builder(entry, grid):
    B, H, Lq, Lkv, block = grid
    assert_same_blocks(MASK_MODS[entry](B, H, Lq, Lkv, DEVICE), B, H, Lq, Lkv, block)


# ---- attention-gym masks, random block sizes, broadcast and per-batch/per-head masks ------------------


def _random_docs(L, max_docs=6):
    lengths = torch.randint(1, max(2, L // 2), (max_docs,))
    lengths = lengths[lengths.cumsum(0) < L]
    lengths = torch.cat([lengths, (L - lengths.sum()).view(1)])
    return V.document_ids_from_lengths(lengths).to(DEVICE)


def _gym(name, B, L):
    if name == "causal":
        return V.causal()
    if name == "sliding-window":
        return V.sliding_window(int(torch.randint(1, L, ())))
    if name == "prefix-lm":
        return V.prefix_lm(int(torch.randint(0, L, ())))
    if name == "prefix-lm-per-batch":
        return V.prefix_lm(torch.randint(0, L, (B,), dtype=torch.int32, device=DEVICE))
    if name == "document":
        return V.document_mask(_random_docs(L))
    if name == "document-causal-per-batch":
        return V.document_mask(torch.stack([_random_docs(L) for _ in range(B)]), V.causal())
    if name == "dilated":
        return V.dilated_sliding_window(4, 3)
    if name == "chunked":
        return V.chunked(int(torch.randint(1, L, ())), causal=True)
    if name == "natten-1d":
        return V.natten_1d(L, int(torch.randint(1, L, ())))
    if name == "natten-2d":
        return V.natten_2d(L // 10, 10, (3, 5))
    if name == "per-head-window":
        return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 4 * b + 8 * h
    raise KeyError(name)


GYM = [
    "causal", "sliding-window", "prefix-lm", "prefix-lm-per-batch", "document", "document-causal-per-batch",
    "dilated", "chunked", "natten-1d", "natten-2d", "per-head-window",
]  # fmt: skip
BLOCKS = [2, 3, 8, 16, 24, 32, 64]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name", GYM)
def test_attention_gym_masks_with_random_block_sizes(name, seed):
    L = int(torch.randint(40, 100, ()))
    B = 2
    H = None if name != "per-head-window" else 3
    block = (BLOCKS[int(torch.randint(len(BLOCKS), ()))], BLOCKS[int(torch.randint(len(BLOCKS), ()))])
    mask = assert_same_blocks(_gym(name, B, L), B, H, L, L, block)
    assert mask.kv_num_blocks.shape[:2] == (B, H or 1)


@pytest.mark.parametrize("separate_full", [True, False], ids=["full-separated", "all-partial"])
@pytest.mark.parametrize("batch_heads", [(None, None), (3, None), (None, 2), (2, 3)], ids=str)
def test_broadcast_and_separate_full_blocks(batch_heads, separate_full):
    B, H = batch_heads
    mod = or_masks(
        and_masks(V.causal(), lambda b, h, q, kv: (q - kv) < 20 + 5 * h), lambda b, h, q, kv: kv < b
    )
    mask = assert_same_blocks(mod, B, H, 75, 90, (16, 8), separate_full)
    assert (mask.full_kv_indices is None) == (not separate_full)


def test_cross_attention_lengths_and_tiny_masks():
    assert_same_blocks(V.causal(), None, None, 1, 1, 16)
    assert_same_blocks(V.causal(), 1, 1, 5, 300, (4, 64))
    assert_same_blocks(lambda b, h, q, kv: kv % 7 == q % 5, 1, 1, 70, 33, (8, 16))
    assert_same_blocks(V.sliding_window(5), 1, 1, 20, 19, (1, 4))
    assert_same_blocks(V.causal(), 1, 1, 7, 30, (1, 1))


def test_new_lengths_and_new_captured_values_do_not_generate_code():
    docs = _random_docs(100)
    mod = V.document_mask(docs, V.causal())
    create_block_mask(mod, None, None, 100, 100, device=DEVICE, BLOCK_SIZE=16, backend="triton")
    before = codegen_count()
    for L in (64, 100):
        other = V.document_mask(_random_docs(L), V.causal())
        assert_same_blocks(other, None, None, L, L, 16)
    assert codegen_count() == before


def test_interpreter_is_required_on_cpu_and_backend_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        create_block_mask(V.causal(), None, None, 8, 8, device=DEVICE, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        create_block_mask(V.causal(), None, None, 8, 8, device="cpu", backend="triton")


def test_mods_the_compiler_cannot_trace_fall_back_to_the_torch_builder():
    from flexattn.block_mask_device import choose_builder
    from flexattn.compiler import ModCompileError

    def reads_a_value(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx if q_idx.item() >= 0 else q_idx < kv_idx

    choice = choose_builder(reads_a_value, torch.device("cuda"), "auto", 128, 128)
    assert choice.builder == "torch" and "does not compile" in choice.reason and "item" in choice.reason
    with pytest.raises(ModCompileError, match="item"):
        create_block_mask(reads_a_value, None, None, 8, 8, device=DEVICE, backend="triton")


def test_slicing_and_adjust_reuse_device_built_masks():
    mod = V.sliding_window(20)
    big = create_block_mask(mod, 2, None, 100, 120, device=DEVICE, BLOCK_SIZE=16, backend="triton")
    small = big._adjust(50, 70)
    fresh = create_block_mask(mod, 2, None, 50, 70, device=DEVICE, BLOCK_SIZE=16, backend="torch")
    assert torch.equal(small.to_dense(), fresh.to_dense())
    # (a cropped tail block keeps its class from the longer mask: partial where a fresh mask may say full)
    assert torch.equal(big[1].to_dense(), big.to_dense()[1:2])
    assert_well_formed(small.to("cpu"))


@settings(max_examples=10, deadline=None)
@given(expr=mask_exprs(), block=st.sampled_from([(8, 8), (4, 16), (16, 3)]))
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_random_mask_expressions_match_the_torch_builder(expr, block):
    assert_same_blocks(make_mod(expr), 2, 2, 29, 37, block)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["causal", "sliding-window", "prefix-lm-per-batch", "document-causal-per-batch"]
)
def test_real_sizes_on_the_gpu(name):
    """S = 16384 (128 x 128 blocks of 128), B = 2: the same blocks as the torch builder."""
    S, B = 16384, 2
    assert_same_blocks(_gym(name, B, S), B, None, S, S, 128)


def test_attention_with_a_device_built_mask_matches_the_torch_built_one():
    from flexattn import flex_attention

    B, H, L = 2, 2, 72
    mod = V.document_mask(torch.stack([_random_docs(L) for _ in range(B)]), V.causal())
    q, k, v = (torch.randn(B, H, L, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    outs = []
    for backend in ("triton", "torch"):
        mask = create_block_mask(mod, B, None, L, L, device=DEVICE, BLOCK_SIZE=16, backend=backend)
        out = flex_attention(q, k, v, block_mask=mask, kernel_options={"BACKEND": "TRITON"})
        outs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want)
