"""Paged KV caches (flexattn.paged): paged attention equals contiguous attention, and the allocator's
bookkeeping.

Every attention case writes fresh random keys into a paged cache whose pages were handed out in a
shuffled order (sequences grow in turns while a filler sequence takes and frees pages in between),
fills every row nobody wrote with a large finite value (a key that leaks into the softmax shows),
and compares ``flex_attention`` over the cache with the float64 reference over the contiguous
keys, three ways (tests/helpers.py). On CPU the kernels run through Triton's interpreter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from flexattn import Positions, create_block_mask, flex_attention
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.forward import flex_forward
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.tiles import Tiles
from flexattn.paged import PagedAttention
from flexattn.reference import reference_attention
from tests.helpers import assert_close_to_gold

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)
gpu = pytest.mark.gpu
POISON = 300.0  # written into every cache row no sequence owns


@dataclass
class PagedCase:
    """A paged cache with one sequence per batch element and the same keys laid out contiguously."""

    paged: PagedAttention
    k_cache: torch.Tensor  # (1, Hkv, n_pages * page, E)
    v_cache: torch.Tensor
    k: torch.Tensor  # (B, Hkv, Lkv, E), zero past each sequence's length
    v: torch.Tensor
    lengths: torch.Tensor  # int32 (B,)


def make_paged(lengths, page, Hkv, E, Ev, dtype, device="cpu", spare_pages=3, spare_row=1) -> PagedCase:
    """Fresh keys for sequences of ``lengths`` in a paged cache with shuffled page assignments;
    ``spare_row``: page-table columns past the longest sequence's pages (0: a read past the row's
    end reads the next row, or past the table)."""
    B, Lkv = len(lengths), max(lengths)
    per_seq = [-(-n // page) for n in lengths]
    n_pages = sum(per_seq) + spare_pages + 4
    paged = PagedAttention(n_pages, page, B + 1, device=device, max_pages_per_seq=-(-Lkv // page) + spare_row)
    filler = B  # a batch slot that takes pages in between and frees them: holes, shuffled order
    grown = [0] * B
    while grown != per_seq:
        b = int(torch.randint(B, ()))
        if grown[b] < per_seq[b]:
            grown[b] = min(per_seq[b], grown[b] + int(torch.randint(1, 3, ())))
            paged.reserve(b, min(lengths[b], grown[b] * page))
        still_needed = sum(per_seq) - sum(grown)
        room = paged.capacity[filler] + page <= paged.max_seq_len
        if int(torch.randint(3, ())) == 0 and paged.free_pages > still_needed + 1 and room:
            paged.reserve(filler, paged.capacity[filler] + page)
    paged.erase(filler)

    k = torch.randn(B, Hkv, Lkv, E, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lkv, Ev, device=device).to(dtype)
    k_cache = torch.full((1, Hkv, n_pages * page, E), POISON, device=device, dtype=dtype)
    v_cache = torch.full((1, Hkv, n_pages * page, Ev), POISON, device=device, dtype=dtype)
    for b, n in enumerate(lengths):
        k[b, :, n:] = 0
        v[b, :, n:] = 0
        # written in two steps at their logical positions, as a prefill and its continuation would
        for lo, hi in ((0, n // 2), (n // 2, n)):
            pos = torch.arange(lo, hi, device=device)[None]
            batch = torch.tensor([b], device=device)
            paged.assign(batch, pos, k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi], k_cache, v_cache)
    lengths_t = torch.tensor(lengths, dtype=torch.int32, device=device)
    return PagedCase(paged, k_cache, v_cache, k, v, lengths_t)


def causal_from(offset):
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def alibi(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * 0.125 * (q_idx - kv_idx).abs()


def check_paged_call(
    case, q, mask_mod, score_mod, blocks, q_len, backend="TRITON", scale=None, per_head=False, options=None
):
    """flex_attention over the paged cache vs the reference over the contiguous keys (``options``:
    more kernel_options)."""
    B, Lkv = q.shape[0], case.k.shape[2]
    H = q.shape[1] if per_head else None
    logical = create_block_mask(mask_mod, B, H, q_len, Lkv, device=q.device, BLOCK_SIZE=blocks)
    mask = case.paged.convert_logical_block_mask(logical, torch.arange(B, device=q.device), case.lengths)
    out, lse = flex_attention(
        q, case.k_cache, case.v_cache, score_mod=score_mod, block_mask=mask, scale=scale,
        enable_gqa=True, return_lse=True, kernel_options={"BACKEND": backend, **(options or {})},
    )  # fmt: skip

    lengths = case.lengths

    def contiguous_mask(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx < lengths[b])

    dense = create_block_mask(contiguous_mask, B, H, q_len, Lkv, device=q.device, BLOCK_SIZE=blocks)
    gold = reference_attention(q.double(), case.k.double(), case.v.double(), score_mod, dense, scale)
    eager = reference_attention(q, case.k, case.v, score_mod, dense, scale, compute_dtype=q.dtype)
    assert_close_to_gold(out, gold[0], eager[0], name="out")
    assert_close_to_gold(lse, gold[1], eager[1], name="lse")
    return out


# ---- paged equals contiguous ------------------------------------------------------------------------

PREFILL = [  # (page, KV block, lengths, dtype)
    (16, 32, (17, 1, 45), torch.float32),
    (16, 64, (97, 33), torch.float16),
    (32, 32, (40, 64, 7), torch.float32),
    (64, 64, (97, 1, 64), torch.float16),
    (64, 128, (130, 20), torch.float32),
    (128, 128, (129, 50), torch.float16),
]  # pages of 256 (257-row prefills are slow in the interpreter): the chunked-prefill and kernel tests


@interpreted
@pytest.mark.parametrize("masked", ["causal", "noop"])
@pytest.mark.parametrize(
    "page,kv_block,lengths,dtype",
    PREFILL,
    ids=[f"page{p}-kv{k}-L{'/'.join(map(str, n))}" for p, k, n, _ in PREFILL],
)
def test_paged_prefill_equals_contiguous(page, kv_block, lengths, dtype, masked):
    """Ragged sequences in one batch, GQA, a score_mod in logical positions, causal or noop."""
    case = make_paged(lengths, page, Hkv=2, E=16, Ev=32, dtype=dtype)
    q_len = max(lengths)
    q = torch.randn(len(lengths), 4, q_len, 16).to(dtype)
    mask_mod = causal_from(0) if masked == "causal" else (lambda b, h, q_idx, kv_idx: q_idx >= 0)
    check_paged_call(case, q, mask_mod, alibi, (32, kv_block), q_len)


@interpreted
@pytest.mark.parametrize("page", [16, 64, 256])
def test_chunked_prefill_and_decode_read_the_cache_at_an_offset(page):
    """Query rows after a prefix already in the cache: a chunk of 19 rows, then one decode row."""
    lengths = (75, 300) if page == 256 else (75, 122)
    case = make_paged(lengths, page, Hkv=1, E=32, Ev=32, dtype=torch.float32)
    Lkv = max(lengths)
    for q_len in (19, 1):
        offset = Lkv - q_len  # these queries are the last rows of the longest sequence
        q = torch.randn(len(lengths), 2, q_len, 32)
        check_paged_call(case, q, causal_from(offset), alibi, (32, max(page, 32)), q_len)


@interpreted
@pytest.mark.parametrize("page", [16, 64])
def test_per_head_masks_and_an_empty_sequence(page):
    """A mask per query head (a window growing with h) over GQA, and a sequence with no keys yet
    (its rows give out = 0, lse = -inf)."""
    case = make_paged((0, 77, 130), page, Hkv=2, E=16, Ev=16, dtype=torch.float32)
    q = torch.randn(3, 4, 40, 16)

    def window_per_head(b, h, q_idx, kv_idx):
        return (q_idx + 90 >= kv_idx) & (q_idx + 90 - kv_idx < 24 * (h + 1))

    out = check_paged_call(case, q, window_per_head, None, (32, 64), 40, per_head=True)
    assert bool((out[0] == 0).all())


@interpreted
@pytest.mark.parametrize("page", [16, 64, 256])
def test_reference_backend_takes_the_same_call(page):
    case = make_paged((33, 80), page, Hkv=2, E=16, Ev=16, dtype=torch.float64)
    q = torch.randn(2, 4, 80, 16, dtype=torch.float64)
    check_paged_call(case, q, causal_from(0), alibi, (32, max(page, 32)), 80, backend="REFERENCE")


KERNEL_PAGES = [(16, None), (32, None), (32, 64), (64, None), (128, None), (256, None), (48, None)]


@interpreted
@pytest.mark.parametrize(
    "page,block_n", KERNEL_PAGES, ids=[f"page{p}" + (f"-N{n}" if n else "") for p, n in KERNEL_PAGES]
)
def test_kernel_reads_through_any_page_table(page, block_n):
    """flex_forward with PagedKV over a random permutation of pages, any page size (48 too: neither
    divides nor is divided by the tile), tiles within one page or spanning several."""
    B, Hq, Hkv, Lq, Lkv, E = 2, 2, 1, 33, 2 * page + 17, 16
    max_pages = -(-Lkv // page)
    n_pages = B * max_pages + 3
    table = torch.randperm(n_pages)[: B * max_pages].reshape(B, max_pages).to(torch.int32)
    k_cache, v_cache = torch.randn(1, Hkv, n_pages * page, E), torch.randn(1, Hkv, n_pages * page, E)
    kv = PagedKV(table, page, Lkv)
    q = torch.randn(B, Hq, Lq, E)
    kv_block = 96 if page == 48 else max(page, 64)
    mask_mod = causal_from(Lkv - Lq)
    mask = create_block_mask(mask_mod, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=(32, kv_block))
    tiles = None if block_n is None else Tiles(32, block_n, 4, 1, "test: tile spans pages")
    out, lse, _ = flex_forward(
        q, k_cache, v_cache, score_mod=compile_score_mod(alibi), mask_mod=compile_mask_mod(mask_mod),
        tables=mask.tables(), scale=0.3, paged=kv, tiles=tiles,
    )  # fmt: skip
    k, v = kv.gather(k_cache), kv.gather(v_cache)
    gold = reference_attention(q.double(), k.double(), v.double(), alibi, mask, 0.3)
    eager = reference_attention(q, k, v, alibi, mask, 0.3, compute_dtype=torch.float32)
    assert_close_to_gold(out, gold[0], eager[0], name="out")
    assert_close_to_gold(lse, gold[1], eager[1], name="lse")


@interpreted
def test_keys_of_unreserved_pages_never_reach_the_softmax():
    """A logical mask that allows every key, over sequences shorter than the mask: the converted
    mask drops the blocks of pages nobody reserved and masks the rows of half-reserved blocks
    (the cache rows of free pages hold POISON; so do reserved rows past a sequence's length, which
    this mask, without kv_len, lets through)."""
    case = make_paged((10, 50), 16, Hkv=1, E=16, Ev=16, dtype=torch.float32)
    paged, B, Lkv = case.paged, 2, 80
    logical = create_block_mask(lambda b, h, i, j: i >= 0, None, None, 8, Lkv, device="cpu", BLOCK_SIZE=32)
    mask = paged.convert_logical_block_mask(logical, torch.arange(B))  # no kv_len: the reserved pages bound
    q = torch.randn(B, 1, 8, 16)
    out = flex_attention(q, case.k_cache, case.v_cache, block_mask=mask, kernel_options={"BACKEND": "TRITON"})
    reserved = [paged.capacity[b] for b in range(B)]  # 16 and 64 positions
    assert reserved == [16, 64]
    k, v = mask.kv_pages.gather(case.k_cache), mask.kv_pages.gather(case.v_cache)  # (B, 1, Lkv, 16)

    def within_reserved(b, h, q_idx, kv_idx):
        return kv_idx < torch.tensor(reserved)[b]

    dense = create_block_mask(within_reserved, B, None, 8, Lkv, device="cpu", BLOCK_SIZE=32)
    gold = reference_attention(q.double(), k.double(), v.double(), None, dense)
    eager = reference_attention(q, k, v, None, dense, compute_dtype=torch.float32)
    assert_close_to_gold(out, gold[0], eager[0], name="out")


def test_converted_mask_keeps_live_blocks_only():
    paged = PagedAttention(16, 16, 2, device="cpu")
    paged.reserve(0, 70)  # pages for 80 positions; 70 live with kv_len
    paged.reserve(1, 16)
    logical = create_block_mask(lambda b, h, i, j: i >= j, None, None, 128, 128, device="cpu", BLOCK_SIZE=32)
    mask = paged.convert_logical_block_mask(logical, torch.arange(2), kv_len=torch.tensor([70, 16]))
    dense_full = mask._dense_blocks(full=True)[:, 0]  # (B, NQ, NKV)
    dense_partial = mask._dense_blocks(full=False)[:, 0]
    logical_full = logical._dense_blocks(full=True)[0, 0]
    logical_any = logical_full | logical._dense_blocks(full=False)[0, 0]
    for b, live in ((0, 70), (1, 16)):
        kv_blocks = torch.arange(4)
        whole = (kv_blocks + 1) * 32 <= live
        some = kv_blocks * 32 < live
        visited = dense_full[b] | dense_partial[b]
        assert torch.equal(visited, logical_any & some[None, :])
        assert torch.equal(dense_full[b], logical_full & whole[None, :])
    assert mask.kv_pages.page_table.dtype == torch.int32 and mask.kv_pages.kv_len == 128


def test_paged_mask_moves_with_its_table_and_refuses_slicing():
    paged = PagedAttention(4, 16, 2, device="cpu")
    paged.reserve(0, 20)
    logical = create_block_mask(lambda b, h, i, j: i >= j, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    mask = paged.convert_logical_block_mask(logical, torch.arange(2)).to("cpu")
    assert mask.kv_pages.page_table.device.type == "cpu" and mask.kv_pages.page_size == 16
    with pytest.raises(ValueError, match="slice the logical mask, then convert the slice"):
        mask[0]


# ---- drop-in for PyTorch's PagedAttention -------------------------------------------------------------


def test_pytorch_paged_attention_code_runs_unchanged():
    """gpt-fast style code written for torch's PagedAttention gives the same result on flexattn
    (page size = KV block, PyTorch's constraint)."""
    torch_paged = pytest.importorskip("torch.nn.attention.experimental._paged_attention")
    from torch.nn.attention import flex_attention as torch_flex

    B, H, L, E, page, n_pages = 2, 2, 256, 16, 128, 6
    ours_cache = PagedAttention(n_pages, page, B, device="cpu")
    theirs_cache = torch_paged.PagedAttention(n_pages, page, B, device="cpu")
    k, v, q = (torch.randn(B, H, L, E) for _ in range(3))
    results = []
    for flex, make_mask, cache in (
        (flex_attention, create_block_mask, ours_cache),
        (torch_flex.flex_attention, torch_flex.create_block_mask, theirs_cache),
    ):
        k_cache, v_cache = torch.zeros(1, H, n_pages * page, E), torch.zeros(1, H, n_pages * page, E)
        for b in (1, 0):  # reserved out of order: the pages interleave
            cache.reserve(torch.tensor(b), torch.tensor(L))
        batch_idx = torch.arange(B)
        cache.assign(batch_idx, torch.arange(L)[None].expand(B, L), k, v, k_cache, v_cache)
        logical = make_mask(lambda b, h, i, j: i >= j, B, H, L, L, device="cpu", BLOCK_SIZE=page)
        mask = cache.convert_logical_block_mask(logical, batch_idx)
        score_mod = cache.get_score_mod(alibi)
        try:
            results.append(flex(q, k_cache, v_cache, score_mod=score_mod, block_mask=mask))
        except Exception as err:  # torch's eager CPU path may be missing in a build
            pytest.skip(f"torch's flex_attention over its PagedAttention failed on CPU: {err}")
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


# ---- allocator bookkeeping ------------------------------------------------------------------------------


def test_reserve_grows_and_never_shrinks():
    paged = PagedAttention(n_pages=10, page_size=16, max_batch_size=2, device="cpu")
    paged.reserve(0, 17)
    assert paged.capacity[0] == 32 and paged.free_pages == 8
    first = paged.page_table[0, :2].tolist()
    paged.reserve(0, 5)  # already enough: nothing changes
    assert paged.capacity[0] == 32 and paged.page_table[0, :2].tolist() == first
    paged.reserve(torch.tensor([1, 0]), torch.tensor([16, 48]))
    assert paged.capacity == [48, 16] and paged.free_pages == 6
    assert paged.page_table[0, :2].tolist() == first  # growth keeps the pages already written
    owned = paged.page_table[paged.page_table >= 0].tolist()
    assert len(set(owned)) == len(owned) == 4 and all(0 <= p < 10 for p in owned)
    assert (paged.page_table[0, 3:] == -1).all() and (paged.page_table[1, 1:] == -1).all()


def test_erase_frees_pages_for_reuse():
    paged = PagedAttention(n_pages=4, page_size=32, max_batch_size=3, device="cpu")
    paged.reserve(0, 64)
    paged.reserve(1, 64)
    pages_of_0 = set(paged.page_table[0, :2].tolist())
    paged.erase(0)
    assert paged.capacity[0] == 0 and (paged.page_table[0] == -1).all() and paged.free_pages == 2
    slot = paged.allocate(50)  # the first empty slot, served from the freed pages
    assert slot == 0 and set(paged.page_table[0, :2].tolist()) == pages_of_0
    with pytest.raises(ValueError, match="out of pages"):
        paged.allocate(1)


def test_out_of_pages_reserves_nothing():
    paged = PagedAttention(n_pages=3, page_size=16, max_batch_size=2, device="cpu")
    paged.reserve(0, 16)
    with pytest.raises(ValueError, match="out of pages: 3 more pages of 16 requested, 2 free"):
        paged.reserve(torch.tensor([0, 1]), torch.tensor([32, 32]))
    assert paged.capacity == [16, 0] and paged.free_pages == 2


def test_allocate_needs_a_free_slot():
    paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=1, device="cpu")
    assert paged.allocate(3) == 0
    with pytest.raises(ValueError, match="all 1 batch slots hold a sequence"):
        paged.allocate(3)


@pytest.mark.parametrize("page", [0, 8, 24, 100])
def test_page_size_must_be_a_multiple_of_16(page):
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 16"):
        PagedAttention(n_pages=4, page_size=page, max_batch_size=1, device="cpu")


def test_batch_index_out_of_range():
    paged = PagedAttention(n_pages=4, page_size=16, max_batch_size=2, device="cpu")
    for call in (lambda: paged.reserve(2, 5), lambda: paged.erase(-1)):
        with pytest.raises(ValueError, match=r"batch index -?\d is out of range \[0, 2\)"):
            call()
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 16, 16, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="batch index 5 is out of range"):
        paged.convert_logical_block_mask(mask, torch.tensor([0, 5]))


def test_sequence_longer_than_the_table():
    paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=1, device="cpu", max_pages_per_seq=2)
    with pytest.raises(ValueError, match="at most max_pages_per_seq=2"):
        paged.reserve(0, 33)
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 16, 48, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="KV_LEN=48 but a sequence holds at most 32"):
        paged.convert_logical_block_mask(mask)


def test_page_size_must_divide_the_kv_block():
    paged = PagedAttention(n_pages=8, page_size=32, max_batch_size=1, device="cpu")
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 48, 48, device="cpu", BLOCK_SIZE=(16, 48))
    with pytest.raises(ValueError, match="page_size=32 must divide the block mask's KV block 48"):
        paged.convert_logical_block_mask(mask)


def test_assign_refuses_unreserved_positions():
    paged = PagedAttention(n_pages=4, page_size=16, max_batch_size=2, device="cpu")
    paged.reserve(0, 20)
    k_cache = torch.zeros(1, 1, 64, 8)
    val = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"input_pos\[0, 1\]=32 lies outside the 32 positions reserved"):
        paged.assign(torch.tensor([0]), torch.tensor([[31, 32]]), val, val, k_cache, k_cache.clone())
    with pytest.raises(ValueError, match="k_cache must be"):
        paged.assign(torch.tensor([0]), torch.tensor([[0, 1]]), val, val, k_cache[:, :, :32], k_cache)


def test_assign_writes_logical_positions_to_their_pages():
    paged = PagedAttention(n_pages=6, page_size=16, max_batch_size=2, device="cpu")
    paged.reserve(1, 16)
    paged.reserve(0, 40)
    k_cache, v_cache = torch.zeros(1, 2, 96, 4), torch.zeros(1, 2, 96, 3)
    k, v = torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 3)
    paged.assign(torch.tensor([0]), torch.arange(40)[None], k, v, k_cache, v_cache)
    for pos in (0, 15, 16, 39):
        row = int(paged.page_table[0, pos // 16]) * 16 + pos % 16
        assert torch.equal(k_cache[0, :, row], k[0, :, pos]) and torch.equal(v_cache[0, :, row], v[0, :, pos])


def test_the_layers_of_a_step_share_the_rows_of_their_positions():
    """assign with the very index tensors of the previous call (a model's layers in one step) reuses
    its checked rows; an in-place edit of the positions, a reservation or an erase recomputes (and
    re-checks) them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Gathers(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Gathers.count += func is torch.ops.aten.gather.default
            return func(*args, **(kwargs or {}))

    paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=2, device="cpu")
    paged.reserve(0, 20)
    paged.reserve(1, 5)
    batch, pos = torch.tensor([0, 1]), torch.tensor([[17], [3]])
    caches = [(torch.zeros(1, 1, 128, 4), torch.zeros(1, 1, 128, 4)) for _ in range(3)]

    def written(layer, b, p):
        k_cache = caches[layer][0]
        return k_cache[0, :, int(paged.page_table[b, p // 16]) * 16 + p % 16]

    with Gathers():
        for layer in range(3):
            val = torch.randn(2, 1, 1, 4)
            paged.assign(batch, pos, val, val, *caches[layer])
            assert torch.equal(written(layer, 0, 17), val[0, :, 0]) and torch.equal(
                written(layer, 1, 3), val[1, :, 0]
            )
    assert Gathers.count == 1  # the rows were found once for the three layers

    with Gathers():
        pos += 1  # in place: the next positions are found again
        val = torch.randn(2, 1, 1, 4)
        paged.assign(batch, pos, val, val, *caches[0])
        assert torch.equal(written(0, 0, 18), val[0, :, 0]) and torch.equal(written(0, 1, 4), val[1, :, 0])
        assert Gathers.count == 2
        paged.reserve(0, 33)  # a new page: the page table changed
        paged.assign(batch, pos, val, val, *caches[0])
        assert Gathers.count == 3
    paged.erase(1)  # the same tensors again: checked again, sequence 1 holds no position now
    with pytest.raises(ValueError, match=r"input_pos\[1, 0\]=4 lies outside the 0 positions reserved"):
        paged.assign(batch, pos, val, val, *caches[0])


# ---- errors of the attention call, the same on every backend ---------------------------------------------


def test_paged_prefill_on_hopper_takes_the_gluon_forward_unless_told_otherwise():
    """The plan's choice for an sm_90 target (no GPU needed): Gluon over pages by default, Triton for
    the same call over contiguous K/V or with PREFILL_KERNEL='TRITON'."""
    from flexattn.kernels.device import DeviceLimits
    from flexattn.options import KernelOptions
    from flexattn.plan import plan_attention

    h100 = DeviceLimits((9, 0), 232448, 132)
    case = make_paged((300, 130), 16, Hkv=1, E=64, Ev=64, dtype=torch.bfloat16)
    logical = create_block_mask(causal_from(44), 2, None, 256, 300, BLOCK_SIZE=(128, 128))
    mask = case.paged.convert_logical_block_mask(logical, torch.arange(2), case.lengths)
    q = torch.zeros(2, 2, 256, 64, dtype=torch.bfloat16)

    def choice(block_mask, k, options):
        plan = plan_attention(None, block_mask, 256, 300, 0.125, options, q.device, q.dtype,
                              kv_pages=getattr(block_mask, "kv_pages", None))  # fmt: skip
        return plan.prefill_forward(q, k, k, target=h100)

    assert choice(mask, case.k_cache, KernelOptions()).kind == "gluon"
    assert choice(mask, case.k_cache, KernelOptions(PREFILL_KERNEL="TRITON")).kind == "triton"
    assert choice(logical, case.k, KernelOptions()).kind == "triton"  # E64, contiguous
    wide = torch.zeros(2, 1, 300, 128, dtype=torch.bfloat16)
    q = torch.zeros(2, 2, 256, 128, dtype=torch.bfloat16)
    assert choice(logical, wide, KernelOptions()).kind == "gluon"  # E128, contiguous


@pytest.mark.parametrize("backend", ["REFERENCE", "TRITON"])
def test_paged_call_errors(backend):
    if backend == "TRITON" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU needs TRITON_INTERPRET=1")
    case = make_paged((20, 30), 16, Hkv=1, E=16, Ev=16, dtype=torch.float32)
    logical = create_block_mask(lambda b, h, i, j: i >= j, None, None, 30, 30, device="cpu", BLOCK_SIZE=32)
    mask = case.paged.convert_logical_block_mask(logical, torch.arange(2))
    options = {"BACKEND": backend}
    q = torch.randn(2, 1, 30, 16)
    with pytest.raises(ValueError, match=r"paged key cache must be \(1, Hkv, n_pages \* page_size, E\)"):
        flex_attention(q, case.k, case.v, block_mask=mask, kernel_options=options)
    with pytest.raises(ValueError, match=r"page_table must be int32 \(B=3, MAX_PAGES\)"):
        flex_attention(
            torch.randn(3, 1, 30, 16), case.k_cache, case.v_cache, block_mask=mask, kernel_options=options
        )
    with pytest.raises(ValueError, match="inference only"):
        flex_attention(
            q.requires_grad_(), case.k_cache, case.v_cache, block_mask=mask, kernel_options=options
        )


# ---- GPU: real sizes, bf16, the TMA path ----------------------------------------------------------------


@gpu
@pytest.mark.parametrize("page", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("q_len", [1, 8, 1000])
def test_gpu_paged_equals_contiguous(page, q_len):
    """B4 Hq8 Hkv2 E128 bf16, ragged caches of 700..3000 keys; the last q_len rows of each sequence."""
    lengths = (3000, 700, 1500, 2100)
    case = make_paged(lengths, page, Hkv=2, E=128, Ev=128, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(4, 8, q_len, 128, device="cuda").to(torch.bfloat16)
    scale = 1 / math.sqrt(128)
    with torch.no_grad():
        check_paged_call(case, q, causal_from(max(lengths) - q_len), alibi, (128, max(page, 128)), q_len,
                         scale=scale)  # fmt: skip


@gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU"
)
@pytest.mark.parametrize(
    "page, kv_block, longest",
    [(16, 128, 2047), (16, 256, 1950), (32, 128, 1950), (64, 128, 2047), (128, 256, 1850), (256, 256, 1950)],
)  # (1950 / 1850: the last tile holds pages past the last one, masked; KV block 256: tiles past KV_LEN)
@pytest.mark.parametrize("E", [64, 128])
def test_gpu_paged_prefill_takes_the_gluon_forward_by_default_on_hopper(page, kv_block, longest, E):
    """Chunked prefill over a paged cache (ragged caches, GQA, causal + ALiBi, an odd chunk; page-table
    rows exactly as long as the longest sequence needs): the default call equals the forced Gluon
    one bit for bit (so the default ran it), and both the Gluon and the Triton forward are judged
    against the float64 reference."""
    lengths, q_len = (1500, 333, 1024, longest), 517
    case = make_paged(lengths, page, Hkv=2, E=E, Ev=E, dtype=torch.bfloat16, device="cuda", spare_row=0)
    q = torch.randn(4, 8, q_len, E, device="cuda").to(torch.bfloat16)
    args = (case, q, causal_from(max(lengths) - q_len), alibi, (128, kv_block), q_len)
    with torch.no_grad():
        default = check_paged_call(*args, scale=E**-0.5)
        gluon = check_paged_call(*args, scale=E**-0.5, options={"PREFILL_KERNEL": "GLUON"})
        triton_out = check_paged_call(*args, scale=E**-0.5, options={"PREFILL_KERNEL": "TRITON"})
    assert torch.equal(default, gluon)
    assert (gluon.float() - triton_out.float()).abs().max().item() < 3e-2


@gpu
def test_gpu_paged_decode_bounded_by_positions_replays_in_a_cuda_graph():
    """examples/generate.py's paged decode step: a mask over the whole sequence converted to the page
    table once (no kv_len), each step bounded by Positions on the device (offsets and lengths updated
    in place between replays). Every replay equals the eager call, and the float64 reference over
    each sequence's first kv_lengths[b] keys (rows past them hold POISON in the cache)."""
    from tests.test_cuda_graphs import _assert_replay_equals_eager, _capture

    lengths = (3000, 700, 1500, 2100)
    case = make_paged(lengths, 64, Hkv=2, E=128, Ev=128, dtype=torch.bfloat16, device="cuda")
    B, span = len(lengths), case.paged.max_seq_len
    logical = create_block_mask(lambda b, h, i, j: i >= 0, None, None, span, span, device="cuda",
                                BLOCK_SIZE=(128, 128))  # fmt: skip
    mask = case.paged.convert_logical_block_mask(logical, torch.arange(B, device="cuda"))
    kv_lengths = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    offsets = kv_lengths - 1
    positions = Positions(q_offset=offsets, kv_lengths=kv_lengths)
    q = torch.randn(B, 8, 1, 128, device="cuda").to(torch.bfloat16)

    def run():
        return flex_attention(q, case.k_cache, case.v_cache, block_mask=mask, enable_gqa=True,
                              positions=positions, return_lse=True)  # fmt: skip

    with torch.no_grad():
        graph, captured = _capture(run)
        for step in ((3000, 700, 1500, 2100), (1, 699, 64, 2000), (2999, 129, 1, 1024)):
            kv_lengths.copy_(torch.tensor(step, dtype=torch.int32))
            offsets.copy_(kv_lengths - 1)
            q.copy_(torch.randn_like(q))
            _assert_replay_equals_eager(graph, captured, run)
            where = Positions(q_offset=offsets.cpu(), kv_lengths=kv_lengths.cpu())
            gold = reference_attention(q.double().cpu(), case.k.double().cpu(), case.v.double().cpu(),
                                       positions=where)  # fmt: skip
            eager = reference_attention(q.cpu(), case.k.cpu(), case.v.cpu(), positions=where,
                                        compute_dtype=q.dtype)  # fmt: skip
            assert_close_to_gold(captured[0].cpu(), gold[0], eager[0], name=f"out at {step}")


@gpu
def test_gpu_assign_and_convert_do_not_synchronise():
    """With device index tensors, a decode step's cache bookkeeping never waits for the GPU."""
    paged = PagedAttention(n_pages=8, page_size=16, max_batch_size=2, device="cuda")
    paged.reserve(0, 40)
    paged.reserve(1, 20)
    k_cache = torch.zeros(1, 2, 8 * 16, 8, device="cuda")
    val = torch.randn(2, 2, 1, 8, device="cuda")
    batch = torch.tensor([0, 1], device="cuda")
    pos = torch.tensor([[39], [19]], device="cuda")
    mask = create_block_mask(lambda b, h, i, j: i >= j, 2, None, 1, 48, device="cuda", BLOCK_SIZE=(16, 16))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        paged.assign(batch, pos, val, val, k_cache, k_cache.clone())
        paged.convert_logical_block_mask(mask, batch, kv_len=pos[:, 0] + 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(k_cache[0][:, paged.page_table[0, 2].long() * 16 + 7], val[0, :, 0])


@gpu
def test_gpu_assign_of_an_unreserved_position_fails_on_the_device():
    """The device-side check fails the process's next synchronising call (a subprocess: the CUDA
    context does not survive a device assertion)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from flexattn.paged import PagedAttention\n"
        "p = PagedAttention(n_pages=4, page_size=16, max_batch_size=1, device='cuda')\n"
        "p.reserve(0, 16)\n"
        "c = torch.zeros(1, 1, 64, 8, device='cuda'); v = torch.randn(1, 1, 1, 8, device='cuda')\n"
        "b, pos = torch.tensor([0], device='cuda'), torch.tensor([[16]], device='cuda')\n"
        "p.assign(b, pos, v, v, c, c.clone())\n"
        "torch.cuda.synchronize()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    failed = "outside the positions reserved" in done.stderr or "device-side assert" in done.stderr
    assert done.returncode != 0 and failed, done.stderr[-2000:]
