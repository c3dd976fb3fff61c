"""The variant library: every mod against an independent dense definition built directly in torch.

Masks are compared element by element (``create_mask`` of the mod vs a dense matrix built from
``tril``/``triu``/``block_diag``/``kron``/loops). Score mods and masks are then run through
``flexattn.flex_attention`` on CPU and compared, three ways, with dense float64 attention that uses
the dense definition (gradients of the learnable tables included).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn import create_block_mask, create_mask, flex_attention
from flexattn import variants as V
from tests.helpers import assert_close_to_gold

# ---------------------------------------------------------------------------------------------------
# Dense definitions, written from the papers' descriptions and independent of the mods' code.
# Each returns a bool (Lq, Lkv) matrix (or (B, Lq, Lkv) where the variant depends on the batch).
# ---------------------------------------------------------------------------------------------------


def ones(lq, lkv=None):
    return torch.ones(lq, lq if lkv is None else lkv, dtype=torch.bool)


def dense_band(L, below, above):
    """Keys from ``i - below`` to ``i + above``."""
    return ones(L).tril(above) & ones(L).triu(-below)


def dense_dilated(L, window, dilation, causal):
    m = torch.zeros(L, L, dtype=torch.bool)
    for t in range(window + 1):
        m |= _diag(L, -t * dilation)
        if not causal:
            m |= _diag(L, t * dilation)
    return m


def _diag(L, offset):
    """Ones on one diagonal (offset < 0: below the main diagonal)."""
    if abs(offset) >= L:
        return torch.zeros(L, L, dtype=torch.bool)
    return torch.diag(torch.ones(L - abs(offset), dtype=torch.bool), offset)


def dense_natten_1d(L, k):
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        start = min(max(i - k // 2, 0), L - k)
        m[i, start : start + k] = True
    return m


def dense_chunks(lengths, inner):
    """Block-diagonal matrix with ``inner(n)`` on the diagonal block of each length ``n``."""
    return torch.block_diag(*[inner(n).int() for n in lengths]).bool()


def dense_causal(n):
    return ones(n).tril()


def dense_prefix(n, p):
    m = dense_causal(n)
    m[:, :p] = True
    return m


MASK_CASES = {}  # id -> () -> (mask_mod, dense bool (Lq, Lkv) or (B, Lq, Lkv))


def mask_case(case_id):
    def register(build):
        MASK_CASES[case_id] = build
        return build

    return register


@mask_case("causal-L97")
def _():
    return V.causal(), dense_causal(97)


@mask_case("causal-Lq50-Lkv83")
def _():
    return V.causal(), ones(50, 83).tril()


@mask_case("sliding_window_7-L97")
def _():
    return V.sliding_window(7), dense_band(97, 7, 0)


@mask_case("bidirectional_window_5-L61")
def _():
    return V.sliding_window(5, causal=False), dense_band(61, 5, 5)


@mask_case("prefix_lm_20-L97")
def _():
    return V.prefix_lm(20), dense_prefix(97, 20)


@mask_case("prefix_lm_per_batch-B3-L70")
def _():
    prefixes = (0, 33, 70)
    return V.prefix_lm(torch.tensor(prefixes)), torch.stack([dense_prefix(70, p) for p in prefixes])


@mask_case("dilated_sliding_window_4x3-L90")
def _():
    return V.dilated_sliding_window(4, 3), dense_dilated(90, 4, 3, causal=True)


@mask_case("dilated_window_3x5-L77")
def _():
    return V.dilated_sliding_window(3, 5, causal=False), dense_dilated(77, 3, 5, causal=False)


@mask_case("longformer_6_g3-L80")
def _():
    is_global = torch.arange(80) < 3
    return V.longformer(6, 3), dense_band(80, 6, 6) | is_global[:, None] | is_global[None, :]


@mask_case("chunked_16-L75")
def _():
    return V.chunked(16), dense_chunks([16] * 4 + [11], ones)


@mask_case("chunked_causal_16-L75")
def _():
    return V.chunked(16, causal=True), dense_chunks([16] * 4 + [11], dense_causal)


@mask_case("streaming_llm_2_9-L70")
def _():
    is_sink = torch.arange(70) < 2
    return V.streaming_llm(2, 9), dense_causal(70) & (dense_band(70, 9, 0) | is_sink[None, :])


@mask_case("document-L90")
def _():
    lengths = [10, 1, 40, 39]
    return V.document_mask(V.document_ids_from_lengths(torch.tensor(lengths))), dense_chunks(lengths, ones)


@mask_case("document_causal-offsets-L90")
def _():
    ids = V.document_ids_from_offsets(torch.tensor([0, 33, 34, 90]))
    return V.document_mask(ids, V.causal()), dense_chunks([33, 1, 56], dense_causal)


@mask_case("document_prefix_lm_5-B2-L64")
def _():
    packings = ([20, 44], [3, 30, 30, 1])
    ids = torch.stack([V.document_ids_from_lengths(torch.tensor(p)) for p in packings])  # (2, 64)
    dense = torch.stack([dense_chunks(p, lambda n: dense_prefix(n, 5)) for p in packings])
    return V.document_mask(ids, V.prefix_lm(5)), dense


@mask_case("document_sliding_window_4-L50")
def _():
    ids = V.document_ids_from_lengths(torch.tensor([25, 25]))
    return V.document_mask(ids, V.sliding_window(4)), dense_chunks([25, 25], lambda n: dense_band(n, 4, 0))


@mask_case("natten_1d_k9-L67")
def _():
    return V.natten_1d(67, 9), dense_natten_1d(67, 9)


@mask_case("natten_1d_k8-L40")
def _():
    return V.natten_1d(40, 8), dense_natten_1d(40, 8)


@mask_case("natten_2d_7x11_k3x5-L77")
def _():
    # Row-major tokens: the 2D window is the Kronecker product of the two 1D windows.
    dense = torch.kron(dense_natten_1d(7, 3).int(), dense_natten_1d(11, 5).int()).bool()
    return V.natten_2d(7, 11, (3, 5)), dense


@mask_case("image_cross_attention-Lq60-Lkv30")
def _():
    image_lengths, tags = [8, 15, 7], [4, 20, 41]
    mod = V.image_cross_attention(
        V.document_ids_from_lengths(torch.tensor(image_lengths)),
        V.flamingo_query_spans(torch.tensor(tags), query_length=60),
    )
    dense = torch.zeros(60, 30, dtype=torch.bool)  # text before the first tag sees nothing
    dense[4:20, 0:8] = dense[20:41, 8:23] = dense[41:60, 23:30] = True
    return mod, dense


@mask_case("sink_slot_causal-Lq40-Lkv41")
def _():
    return V.with_sink_slot(V.causal()), torch.cat([ones(40, 1), dense_causal(40)], dim=1)


def build_case(case_id):
    """(mask_mod, B, dense (B, Lq, Lkv))."""
    mod, dense = MASK_CASES[case_id]()
    dense = dense if dense.ndim == 3 else dense[None]
    return mod, dense.shape[0], dense


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_mod_matches_dense_definition(case):
    mod, B, dense = build_case(case)
    _, lq, lkv = dense.shape
    got = create_mask(mod, B, 2, lq, lkv, device="cpu")  # (B, 2, Lq, Lkv)
    assert got.shape == (B, 2, lq, lkv)
    for h in range(2):
        mismatches = (got[:, h] != dense).nonzero().tolist()
        assert not mismatches, f"{mod.__name__}: first mismatches (b, q, kv) {mismatches[:5]}"


# ---------------------------------------------------------------------------------------------------
# Attention with each mod vs dense float64 attention (three-way: flexattn, eager fp32, gold fp64).
# ---------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(E), masked) v; fully masked rows give 0. q: (B, H, Lq, E)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lkv)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def qkv(B, H, lq, lkv, E, dtype):
    make = lambda L: torch.randn(B, H, L, E, dtype=dtype)
    return make(lq), make(lkv), make(lkv)


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_attention_with_mask_matches_dense(case):
    mod, B, dense = build_case(case)
    _, lq, lkv = dense.shape
    allowed = dense[:, None]  # (B, 1, Lq, Lkv)
    block_mask = create_block_mask(mod, B, None, lq, lkv, device="cpu", BLOCK_SIZE=16)
    q, k, v = qkv(B, 2, lq, lkv, 16, torch.float64)
    gold = dense_attention(q, k, v, allowed)
    q32, k32, v32 = q.float(), k.float(), v.float()
    eager = dense_attention(q32, k32, v32, allowed)
    actual = flex_attention(q32, k32, v32, block_mask=block_mask)
    assert_close_to_gold(actual, gold, eager)


def dense_t5_buckets(relative_position, num_buckets, max_distance, bidirectional):
    """Mesh-TensorFlow / Hugging Face T5 ``_relative_position_bucket``, written as in the original."""
    n = -relative_position
    ret = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = torch.maximum(n, torch.zeros_like(n))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = (
        max_exact
        + (
            torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).long()
    )
    val_if_large = torch.minimum(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def relative_positions(lq, lkv):
    return torch.arange(lkv)[None, :] - torch.arange(lq)[:, None]  # (Lq, Lkv): kv_idx - q_idx


def expected_alibi_slopes(H):
    """Press et al.: 2^(-8/n), 2^(-16/n), ... for n = H a power of two; interleaved otherwise."""
    table = {
        8: [2**-i for i in range(1, 9)],
        6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
    }
    return torch.tensor(table[H], dtype=torch.float64)


def test_alibi_slopes_match_paper():
    assert torch.equal(V.alibi_slopes(8).double(), expected_alibi_slopes(8))
    assert torch.equal(V.alibi_slopes(6).double(), expected_alibi_slopes(6))
    assert torch.allclose(
        V.alibi_slopes(12)[8:].double(), 2.0 ** -torch.tensor([0.5, 1.5, 2.5, 3.5]).double()
    )


def test_t5_buckets_match_reference_formula():
    for num_buckets, max_distance, bidirectional in [(32, 128, True), (16, 40, False), (8, 9, True)]:
        rel = torch.arange(-max_distance, max_distance + 1)
        want = dense_t5_buckets(rel, num_buckets, max_distance, bidirectional)
        got = V.t5_buckets(num_buckets, max_distance, bidirectional)
        assert torch.equal(got.long(), want), (num_buckets, max_distance, bidirectional)


def score_case(kind, H, lq, lkv):
    """(fp64 captures, make_mod(*captures), dense_scores(s, *captures)) for one score variant."""
    rel = relative_positions(lq, lkv)
    if kind == "alibi":
        slopes = expected_alibi_slopes(H)[:, None, None]  # (H, 1, 1)
        return [], lambda: V.alibi(H), lambda s: s + slopes.to(s.dtype) * rel
    if kind in ("softcap", "softcap_approx"):
        approx = kind == "softcap_approx"
        return [], lambda: V.tanh_softcap(2.0, approx=approx), lambda s: 2.0 * torch.tanh(s / 2.0)
    num_buckets, max_distance, bidirectional = {"t5": (32, 30, True), "t5_causal": (16, 40, False)}[kind]
    buckets = dense_t5_buckets(
        rel.clamp(-max_distance, max_distance), num_buckets, max_distance, bidirectional
    )
    table = torch.randn(num_buckets, H, dtype=torch.float64)
    return (
        [table],
        lambda t: V.t5_relative_bias(t, max_distance=max_distance, bidirectional=bidirectional),
        lambda s, t: s + t[buckets].permute(2, 0, 1),  # table (buckets, H) -> bias (H, Lq, Lkv)
    )


def assert_three_way(dense, flex, leaves64):
    """Outputs and gradients of every leaf: flexattn (fp32) vs dense fp64 gold and dense fp32 eager."""
    names = ("q", "k", "v")
    leaves64 = [x.detach().requires_grad_() for x in leaves64]
    gold = dense(*leaves64)
    gold_grads = torch.autograd.grad(gold.sum(), leaves64)
    leaves32 = [x.detach().float().requires_grad_() for x in leaves64]
    eager = dense(*leaves32)
    eager_grads = torch.autograd.grad(eager.sum(), leaves32)
    leaves32 = [x.detach().float().requires_grad_() for x in leaves64]
    actual = flex(*leaves32)
    actual_grads = torch.autograd.grad(actual.sum(), leaves32)
    assert_close_to_gold(actual, gold, eager)
    for i, (a, g, e) in enumerate(zip(actual_grads, gold_grads, eager_grads)):
        assert_close_to_gold(
            a, g, e, name=f"gradient of {names[i] if i < len(names) else f'capture {i - 3}'}"
        )


SCORE_CASES = {
    # id: (kind, H, Lq, Lkv)
    "alibi-H8-L45": ("alibi", 8, 45, 45),
    "alibi-H6-Lq33-Lkv50": ("alibi", 6, 33, 50),
    "tanh_softcap_2-H2-L40": ("softcap", 2, 40, 40),
    "tanh_softcap_approx_2-H2-L40": ("softcap_approx", 2, 40, 40),
    "t5_bidirectional-32x3-L70": ("t5", 3, 70, 70),
    "t5_causal-16x2-L60": ("t5_causal", 2, 60, 60),
}


@pytest.mark.parametrize("case", list(SCORE_CASES), ids=list(SCORE_CASES))
def test_score_mod_matches_dense(case):
    kind, H, lq, lkv = SCORE_CASES[case]
    captures, make_mod, dense_scores = score_case(kind, H, lq, lkv)
    q, k, v = qkv(2, H, lq, lkv, 16, torch.float64)

    def dense(q, k, v, *captures):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lkv)
        return torch.softmax(dense_scores(s, *captures), dim=-1) @ v

    def flex(q, k, v, *captures):
        return flex_attention(q, k, v, score_mod=make_mod(*captures))

    assert_three_way(dense, flex, [q, k, v, *captures])


def test_learned_sink_matches_gpt_oss_formula():
    """Sinks as gpt-oss defines them: an extra per-head logit in the softmax, with no value."""
    B, H, L, E = 2, 3, 37, 16

    def dense(q, k, v, sinks):
        s = (q @ k.transpose(-1, -2) / math.sqrt(E)).masked_fill(~dense_causal(L), float("-inf"))
        s = torch.cat([s, sinks[None, :, None, None].expand(B, H, L, 1)], dim=-1)  # (B, H, L, L + 1)
        return torch.softmax(s, dim=-1)[..., :L] @ v

    mask = create_block_mask(V.with_sink_slot(V.causal()), None, None, L, L + 1, device="cpu", BLOCK_SIZE=16)

    def flex(q, k, v, sinks):
        k1, v1 = V.prepend_sink_slot(k, v)  # (B, H, L + 1, E)
        return flex_attention(q, k1, v1, score_mod=V.learned_sink(sinks), block_mask=mask)

    q, k, v = qkv(B, H, L, L, E, torch.float64)
    assert_three_way(dense, flex, [q, k, v, torch.randn(H, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------------
# Names, helpers and argument checks.
# ---------------------------------------------------------------------------------------------------

NAMES = {
    "causal": lambda: V.causal(),
    "sliding_window_64": lambda: V.sliding_window(64),
    "bidirectional_window_8": lambda: V.sliding_window(8, causal=False),
    "prefix_lm_10": lambda: V.prefix_lm(10),
    "dilated_sliding_window_8x2": lambda: V.dilated_sliding_window(8, 2),
    "longformer_32_g4": lambda: V.longformer(32, 4),
    "chunked_128": lambda: V.chunked(128),
    "chunked_causal_128": lambda: V.chunked(128, causal=True),
    "streaming_llm_4_64": lambda: V.streaming_llm(4, 64),
    "document_causal": lambda: V.document_mask(torch.zeros(8, dtype=torch.int32), V.causal()),
    "natten_2d_8x8_k3x3": lambda: V.natten_2d(8, 8, 3),
    "alibi": lambda: V.alibi(4),
    "tanh_softcap_30": lambda: V.tanh_softcap(30.0),
    "tanh_softcap_approx_2.5": lambda: V.tanh_softcap(2.5, approx=True),
    "t5_relative_bias": lambda: V.t5_relative_bias(torch.zeros(32, 2)),
    "learned_sink": lambda: V.learned_sink(torch.zeros(2)),
}


@pytest.mark.parametrize("name", list(NAMES))
def test_mods_have_meaningful_names(name):
    assert NAMES[name]().__name__ == name


def test_document_ids_from_lengths_and_offsets_agree():
    lengths = torch.tensor([3, 1, 5])
    ids = V.document_ids_from_lengths(lengths)
    assert ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2] and ids.dtype == torch.int32
    assert torch.equal(V.document_ids_from_offsets(torch.tensor([0, 3, 4, 9])), ids)
    assert V.document_offsets(ids).tolist() == [0, 3, 4]
    assert V.document_offsets(torch.stack([ids, ids.flip(0).neg() + 2])).tolist() == [[0, 3, 4], [0, 5, 6]]


def test_document_masks_with_a_known_document_count_read_no_value_back():
    """``num_docs`` (from the packing) spares the host-device synchronisation of finding the largest id."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoValueReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a value was read back"
            return func(*args, **(kwargs or {}))

    rows = [V.document_ids_from_lengths(torch.tensor(n)) for n in ([3, 1, 5], [6, 3])]
    ids = torch.stack(rows)  # (2, 9): 3 and 2 documents
    with NoValueReads():
        offsets = V.document_offsets(ids, num_docs=4)
        mods = [V.document_mask(ids, V.causal(), num_docs=3), V.document_mask(ids)]
    assert offsets.tolist() == [[0, 3, 4, 9], [0, 6, 9, 9]]
    same_doc = (ids[:, :, None] == ids[:, None, :])[:, None]  # (2, 1, 9, 9)
    for mod, dense in zip(mods, (same_doc & torch.ones(9, 9, dtype=torch.bool).tril(), same_doc)):
        assert torch.equal(create_mask(mod, 2, 1, 9, 9, device="cpu"), dense)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: V.sliding_window(-1), "window_size"),
        (lambda: V.chunked(0), "chunk_size"),
        (lambda: V.natten_1d(10, 11), "kernel size"),
        (lambda: V.document_ids_from_lengths(torch.tensor([3, 0])), "lengths"),
        (lambda: V.document_ids_from_offsets(torch.tensor([1, 3])), "offsets"),
        (lambda: V.flamingo_query_spans(torch.tensor([5, 2]), 10), "increasing"),
        (lambda: V.t5_relative_bias(torch.zeros(4, 2)), "num_buckets"),
        (lambda: V.tanh_softcap(0.0), "cap"),
    ],
    ids=["window", "chunk", "natten", "lengths", "offsets", "spans", "t5", "softcap"],
)
def test_bad_arguments_say_what_is_wrong(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ---------------------------------------------------------------------------------------------------
# Property tests: random parameters and lengths, same dense definitions.
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 70),
    window=st.integers(0, 20),
    dilation=st.integers(1, 6),
    chunk=st.integers(1, 30),
    causal=st.booleans(),
)
def test_window_family_matches_dense_for_random_parameters(L, window, dilation, chunk, causal):
    cases = [
        (V.sliding_window(window, causal=causal), dense_band(L, window, 0 if causal else window)),
        (
            V.dilated_sliding_window(window, dilation, causal=causal),
            dense_dilated(L, window, dilation, causal),
        ),
        (
            V.chunked(chunk, causal=causal),
            dense_chunks(
                [chunk] * (L // chunk) + ([L % chunk] if L % chunk else []), dense_causal if causal else ones
            ),
        ),
    ]
    for mod, dense in cases:
        assert torch.equal(create_mask(mod, 1, 1, L, L, device="cpu")[0, 0], dense), mod.__name__


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_natten_and_documents_match_dense_for_random_parameters(data):
    height, width = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    kh, kw = data.draw(st.integers(1, height)), data.draw(st.integers(1, width))
    dense = torch.kron(dense_natten_1d(height, kh).int(), dense_natten_1d(width, kw).int()).bool()
    got = create_mask(
        V.natten_2d(height, width, (kh, kw)), 1, 1, height * width, height * width, device="cpu"
    )
    assert torch.equal(got[0, 0], dense)

    lengths = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    prefix = data.draw(st.integers(0, 5))
    mod = V.document_mask(V.document_ids_from_lengths(torch.tensor(lengths)), V.prefix_lm(prefix))
    got = create_mask(mod, 1, 1, sum(lengths), sum(lengths), device="cpu")[0, 0]
    assert torch.equal(got, dense_chunks(lengths, lambda n: dense_prefix(n, prefix)))
