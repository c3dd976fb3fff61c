"""The split-KV decode kernel over a paged KV cache: reading K/V through the page table equals
decoding over the same keys laid out contiguously, and the float64 reference.

Pages are handed out in a shuffled order with holes (``tests/test_paged.make_paged``); rows nobody
wrote hold a large finite value, so a key of an unreserved page or past a sequence's end that leaked
into the softmax would show. Ragged lengths, GQA, queries at the end of each sequence
(``Positions``), a block mask over the whole sequence converted to the page table. On CPU through
Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.decode import flex_decode
from flexattn.kernels.kernel_choice import DecodeTiles
from flexattn.kernels.positions import Positions
from flexattn.options import KernelOptions
from flexattn.plan import plan_attention
from flexattn.reference import reference_attention
from tests.helpers import assert_close_to_gold
from tests.test_paged import alibi, make_paged

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)

HQ, HKV, E, EV = 4, 2, 16, 32


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _decode_both_ways(case, q, positions, blocks, tiles, splits, lengths_in_positions):
    """(paged, contiguous, gold, eager): the decode kernel over the paged cache (converted mask) and
    over the contiguous keys (the logical mask and the lengths), the reference in float64 and in q's
    dtype."""
    B, Lkv = q.shape[0], case.k.shape[2]
    logical = create_block_mask(_causal, None, None, Lkv, Lkv, device="cpu", BLOCK_SIZE=blocks)
    paged_mask = case.paged.convert_logical_block_mask(logical, torch.arange(B), case.lengths)
    score = compile_score_mod(alibi)
    common = dict(score_mod=score, scale=0.3, splits=splits, tiles=tiles)
    paged_positions = positions if lengths_in_positions else Positions(q_offset=positions.q_offset)
    paged = flex_decode(
        q, case.k_cache, case.v_cache, mask_mod=compile_mask_mod(paged_mask.mask_mod),
        tables=paged_mask.tables(), positions=paged_positions, paged=paged_mask.kv_pages, **common,
    )  # fmt: skip
    contiguous = flex_decode(
        q, case.k, case.v, mask_mod=compile_mask_mod(_causal), tables=logical.tables(), positions=positions,
        **common,
    )  # fmt: skip
    gold = reference_attention(
        q.double(), case.k.double(), case.v.double(), alibi, logical, 0.3, positions=positions
    )
    eager = reference_attention(
        q, case.k, case.v, alibi, logical, 0.3, positions=positions, compute_dtype=q.dtype
    )
    return paged, contiguous, gold, eager


CASES = [  # (page, KV block, BLOCK_N or None for the default tile, lengths, dtype)
    (16, 32, None, (17, 1, 97), torch.float32),
    (16, 64, 32, (97, 40), torch.float16),  # 32-key tiles over 16-row pages: per-row addresses
    (16, 64, 64, (64, 17, 1), torch.float32),
    (32, 64, 64, (97, 33), torch.float32),
    (64, 64, None, (97, 1, 64), torch.float16),
    (128, 128, None, (129, 50), torch.float32),
    (256, 256, None, (260, 97), torch.float16),
]


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize(
    "page,kv_block,block_n,lengths,dtype",
    CASES,
    ids=[f"page{p}-kv{k}" + (f"-N{n}" if n else "") + f"-L{'/'.join(map(str, L))}-{str(d)[6:]}"
         for p, k, n, L, d in CASES],
)  # fmt: skip
def test_decode_over_pages_equals_decode_over_the_contiguous_cache(
    page, kv_block, block_n, lengths, dtype, q_len
):
    case = make_paged(lengths, page, Hkv=HKV, E=E, Ev=EV, dtype=dtype)
    q = torch.randn(len(lengths), HQ, q_len, E).to(dtype)
    positions = Positions(q_offset=(case.lengths - q_len).clamp(min=0), kv_lengths=case.lengths)
    tiles = None if block_n is None else DecodeTiles(16, block_n, 4, 1, "test: a tile spans pages")
    for splits, in_positions in ((3, True), (1, False)):
        paged, contiguous, gold, eager = _decode_both_ways(
            case, q, positions, (16, kv_block), tiles, splits, in_positions
        )
        for name, got, want, ref in zip(("out", "lse", "max"), paged, gold, eager):
            assert_close_to_gold(got, want, ref, name=name)
        torch.testing.assert_close(
            paged[0], contiguous[0], atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0
        )
        torch.testing.assert_close(paged[1], contiguous[1], atol=1e-5, rtol=1e-5)


def test_an_empty_sequence_and_a_one_key_sequence():
    """A sequence with no keys gives out 0 and lse -inf (never NaN); one with a single key its value."""
    case = make_paged((0, 1, 40), 16, Hkv=1, E=E, Ev=E, dtype=torch.float32)
    q = torch.randn(3, 2, 1, E)
    positions = Positions(q_offset=(case.lengths - 1).clamp(min=0), kv_lengths=case.lengths)
    paged, _, gold, eager = _decode_both_ways(case, q, positions, (16, 32), None, 2, True)
    assert bool((paged[0][0] == 0).all()) and bool(torch.isneginf(paged[1][0]).all())
    torch.testing.assert_close(paged[0][1, :, 0], case.v[1, 0, 0].expand(2, E), atol=1e-6, rtol=0)
    assert_close_to_gold(paged[0], gold[0], eager[0], name="out")


def test_a_paged_cache_needs_its_block_tables():
    case = make_paged((20,), 16, Hkv=1, E=E, Ev=E, dtype=torch.float32)
    logical = create_block_mask(_causal, 1, None, 20, 20, device="cpu", BLOCK_SIZE=(16, 32))
    kv_pages = case.paged.convert_logical_block_mask(logical, torch.arange(1), case.lengths).kv_pages
    with pytest.raises(ValueError, match="paged cache needs its BlockTables"):
        flex_decode(
            torch.randn(1, 1, 1, E), case.k_cache, case.v_cache, score_mod=compile_score_mod(None),
            mask_mod=compile_mask_mod(None), tables=None, scale=0.25, paged=kv_pages,
        )  # fmt: skip


def test_flex_attention_decodes_a_paged_cache_with_positions():
    """The whole call: a paged mask over the whole sequences, queries at their ends (Positions),
    picked by the decode kernel (AttentionPlan.choose says so) and equal to the reference."""
    lengths = (97, 17, 1)
    case = make_paged(lengths, 32, Hkv=HKV, E=E, Ev=EV, dtype=torch.float32)
    B, Lkv = len(lengths), max(lengths)
    q = torch.randn(B, HQ, 1, E)
    positions = Positions(q_offset=case.lengths - 1, kv_lengths=case.lengths)
    logical = create_block_mask(_causal, None, None, Lkv, Lkv, device="cpu", BLOCK_SIZE=(16, 32))
    mask = case.paged.convert_logical_block_mask(logical, torch.arange(B), case.lengths)
    plan = plan_attention(
        alibi,
        mask,
        1,
        Lkv,
        0.25,
        KernelOptions(BACKEND="TRITON"),
        torch.device("cpu"),
        kv_pages=mask.kv_pages,
    )
    choice = plan.choose(q, case.k_cache, case.v_cache, positions=positions)
    assert choice.kind == "decode" and "positions" in choice.reason, choice
    out, lse = flex_attention(
        q, case.k_cache, case.v_cache, score_mod=alibi, block_mask=mask, scale=0.25, enable_gqa=True,
        return_lse=True, kernel_options={"BACKEND": "TRITON"}, positions=positions,
    )  # fmt: skip
    gold = reference_attention(
        q.double(), case.k.double(), case.v.double(), alibi, logical, 0.25, positions=positions
    )
    eager = reference_attention(q, case.k, case.v, alibi, logical, 0.25, positions=positions)
    assert_close_to_gold(out, gold[0], eager[0], name="out")
    assert_close_to_gold(lse, gold[1], eager[1], name="lse")
