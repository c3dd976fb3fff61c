"""The CPU fast path (flexattn/cpu/) against the float64 reference, three ways.

Every catalog entry through whichever CPU engine it gets (sdpa or fused): out, lse and the gradients
of q, k, v and of learnable captured tensors, with GQA, Lq != Lkv and Ev != E; odd shapes in fp32,
bf16 and fp16; a loss using the LSE; max_scores; fully masked rows; the chunk plan's skipping; and
what explain says for each backend decision (never a silent slow path).
"""

from __future__ import annotations

import pytest
import torch

from flexattn import AuxRequest, create_block_mask, flex_attention
from flexattn import variants as V
from flexattn.cpu.chunks import plan_chunks
from flexattn.dispatch import cpu_choice, explain_backend
from flexattn.kernels.positions import Positions
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

CPU = {"BACKEND": "CPU"}
GQA_SHAPE = Shape(B=2, Hq=4, Hkv=2, Lq=97, Lkv=130, E=16, Ev=24)


def _mask(mod, shape: Shape, block=32):
    if mod is None:
        return None
    return create_block_mask(mod, shape.B, shape.Hq, shape.Lq, shape.lkv, device="cpu", BLOCK_SIZE=block)


def _engine(q, score_mod, want_max=False) -> str:
    return cpu_choice(q, score_mod, None, None, want_max)[0].engine


def _three_way(shape, dtype, score_mod, block_mask, params=(), k_factor=None):
    """Forward and gradients of out . dout on the CPU path vs gold (fp64) and eager (dtype)."""
    q, k, v = make_qkv(shape, dtype, requires_grad=True)
    dout = torch.randn(shape.B, shape.Hq, shape.Lq, shape.ev).to(dtype)
    gold, eager = gold_and_eager(
        q, k, v, score_mod=score_mod, block_mask=block_mask, dout=dout, params=params
    )
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                              kernel_options=CPU, return_lse=True)  # fmt: skip
    grads = torch.autograd.grad(out, [q, k, v, *params], dout, allow_unused=True)
    assert_close_to_gold(out.detach(), gold.out, eager.out, name="out", k=k_factor)
    assert_close_to_gold(lse.detach(), gold.lse, eager.lse, name="lse", k=k_factor)
    names = ["dq", "dk", "dv"] + [f"dparam{i}" for i in range(len(params))]
    for name, g, gg, ge, leaf in zip(names, grads, gold.grads, eager.grads, [q, k, v, *params]):
        zero = torch.zeros_like(leaf)
        g, gg, ge = (zero if t is None else t for t in (g, gg, ge))
        floor = None  # a 0-dim parameter's gradient is one fp32 sum over every score: its own floor
        if leaf.dim() == 0:
            sum_floor = reduction_floor(q, k, v, score_mod, block_mask, None, dout, leaf)
            floor = max(DEFAULT_FLOOR[dtype], sum_floor)
        assert_close_to_gold(g, gg, ge, name=name, k=k_factor, floor=floor)
    return q


@pytest.mark.parametrize("entry", list(CATALOG), ids=list(CATALOG))
def test_catalog_entry_on_the_cpu_path_matches_gold(entry):
    shape = GQA_SHAPE
    mods = CATALOG[entry](shape.B, shape.Hq, shape.Lq, shape.lkv, "cpu")
    params = [p.requires_grad_() for p in mods.params if p.is_floating_point()]
    q = _three_way(shape, torch.float32, mods.score_mod, _mask(mods.mask_mod, shape), params)
    assert _engine(q, mods.score_mod) in ("sdpa", "fused")


PAPER = {
    "causal": (None, V.causal()),
    "alibi-causal": (V.alibi(4), V.causal()),
    "sliding-window": (None, V.sliding_window(40)),
    "prefix-lm": (None, V.prefix_lm(300)),
    "softcap-causal": (V.tanh_softcap(30.0), V.causal()),
}
ODD = [
    Shape(B=1, Hq=4, Lq=1, Lkv=1, E=16),
    Shape(B=2, Hq=4, Hkv=1, Lq=17, Lkv=1000, E=32),
    Shape(B=1, Hq=4, Hkv=2, Lq=1030, E=64),
]
CASES = [(s, torch.float32) for s in ODD] + [
    (ODD[1], torch.bfloat16),
    (ODD[2], torch.bfloat16),
    (ODD[1], torch.float16),
]


@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s.id}-{DTYPE_IDS[d]}" for s, d in CASES])
@pytest.mark.parametrize("variant", list(PAPER))
def test_paper_variants_odd_shapes_and_dtypes(shape, dtype, variant):
    score_mod, mask_mod = PAPER[variant]
    _three_way(shape, dtype, score_mod, _mask(mask_mod, shape, block=128))


def test_document_mask_in_bf16_matches_gold():
    shape = Shape(B=2, Hq=4, Lq=700, E=64)
    doc = V.document_ids_from_lengths(torch.tensor([100, 250, 1, 349]))
    _three_way(shape, torch.bfloat16, None, _mask(V.document_mask(doc, V.causal()), shape, block=64))


@pytest.mark.parametrize("variant", ["causal", "alibi-causal", "softcap-causal"])
def test_a_loss_on_the_lse_reaches_q_and_k(variant):
    """dlse enters the sdpa engine through an extra head column, the fused one through delta."""
    score_mod, mask_mod = PAPER[variant]
    shape = Shape(B=1, Hq=4, Hkv=2, Lq=150, Lkv=190, E=16, Ev=8)
    mask = _mask(mask_mod, shape, block=32)
    q, k, v = make_qkv(shape, torch.float32, requires_grad=True)
    w = torch.randn(shape.B, shape.Hq, shape.Lq)
    results = []
    for opts in (CPU, {"BACKEND": "REFERENCE"}):
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)] if opts != CPU else [q, k, v]
        out, lse = flex_attention(*leaves, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                                  kernel_options=opts, return_lse=True)  # fmt: skip
        loss = out.square().sum() + (torch.where(torch.isinf(lse), 0, lse) * w.to(lse.dtype)).sum()
        results.append(torch.autograd.grad(loss, leaves))
    for name, got, gold in zip(("dq", "dk", "dv"), *results):
        torch.testing.assert_close(got.double(), gold, rtol=1e-4, atol=1e-4, msg=name)


FUSED_KEY_ORDERS = {  # the fused engine puts each chunk's all-FULL kv blocks first, then the others
    "sliding-window": V.sliding_window(40),  # partial blocks on both sides of the full ones: reordered
    "streaming": V.streaming_llm(4, 100),  # sink + window: key runs that are not contiguous
    "document": V.document_mask(V.document_ids_from_lengths(torch.tensor([70, 3, 150, 77]))),
}


@pytest.mark.parametrize("mask_mod", list(FUSED_KEY_ORDERS.values()), ids=list(FUSED_KEY_ORDERS))
def test_fused_engine_key_orders_match_gold(mask_mod):
    shape = Shape(B=2, Hq=4, Hkv=2, Lq=300, Lkv=300, E=16, Ev=24)
    q = _three_way(shape, torch.float32, V.tanh_softcap(20.0), _mask(mask_mod, shape, block=32))
    assert _engine(q, V.tanh_softcap(20.0)) == "fused"


def test_fused_engine_grads_stay_finite_where_a_mod_is_nan_under_the_mask():
    """The kernels skip masked pairs, so a mod's NaN there (value or derivative) reaches nothing."""
    shape = Shape(B=1, Hq=2, Lq=200, Lkv=200, E=16)

    def root_distance(score, b, h, q_idx, kv_idx):  # NaN above the diagonal
        return score * torch.sqrt((q_idx - kv_idx).float() + 1.0) * 0.5

    def safe_root_distance(score, b, h, q_idx, kv_idx):  # the same where causal allows
        return score * torch.sqrt(((q_idx - kv_idx).float() + 1.0).clamp_min(0.0)) * 0.5

    q, k, v = make_qkv(shape, torch.float32, requires_grad=True)
    mask = _mask(V.causal(), shape, block=32)
    results = []
    for mod in (root_distance, safe_root_distance):
        out = flex_attention(q, k, v, score_mod=mod, block_mask=mask, kernel_options=CPU)
        results.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a, b, msg=name)


def test_max_scores_come_from_the_fused_engine():
    shape = Shape(B=2, Hq=2, Lq=70, Lkv=90, E=16)
    q, k, v = make_qkv(shape, torch.float32)
    mask = _mask(V.sliding_window(10), shape, block=16)
    assert _engine(q, None, want_max=True) == "fused"
    _, aux = flex_attention(q, k, v, block_mask=mask, kernel_options=CPU,
                            return_aux=AuxRequest(lse=True, max_scores=True))  # fmt: skip
    _, lse, max_scores = reference_attention(q.double(), k.double(), v.double(), None, mask)
    torch.testing.assert_close(aux.max_scores.double(), max_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.lse.double(), lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "score_mod", [None, V.alibi(2), V.tanh_softcap(5.0)], ids=["mask", "additive", "fused"]
)
def test_fully_masked_rows_give_out_zero_lse_neg_inf_and_zero_grads(score_mod):
    shape = Shape(B=1, Hq=2, Lq=80, Lkv=64, E=16)
    first = 40

    def late_rows(b, h, q_idx, kv_idx):
        return (q_idx >= first) & (kv_idx <= q_idx)

    q, k, v = make_qkv(shape, torch.float32, requires_grad=True)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=_mask(late_rows, shape, 16),
                              kernel_options=CPU, return_lse=True)  # fmt: skip
    assert bool((out[:, :, :first] == 0).all()) and bool(torch.isneginf(lse[:, :, :first]).all())
    assert bool(torch.isfinite(lse[:, :, first:]).all())
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse[:, :, first:].sum(), (q, k, v))
    assert bool((dq[:, :, :first] == 0).all()) and bool(torch.isfinite(dq).all())
    assert bool(dk.abs().sum() > 0) and bool(torch.isfinite(dk).all() & torch.isfinite(dv).all())


def test_chunks_visit_only_listed_blocks_and_unmasked_chunks_carry_no_mask():
    L = 1024
    causal = create_block_mask(V.causal(), None, None, L, L, device="cpu")
    chunks = plan_chunks(causal, L, L)
    assert sum(c.rows * c.cols for c in chunks) / L**2 == pytest.approx(0.75)  # two runs of 512 rows
    assert all(c.classes is not None and c.columns == slice(0, c.stop) for c in chunks)
    fine = plan_chunks(causal, L, L, rows=128)  # one q block per chunk: only the listed blocks
    assert sum(c.rows * c.cols for c in fine) / L**2 == pytest.approx((8 * 9 / 2) / 64)
    noop = plan_chunks(None, L, L + 5)
    assert len(noop) == 1 and noop[0].classes is None and noop[0].cols == L + 5
    streaming = plan_chunks(create_block_mask(V.streaming_llm(4, 100), None, None, L, L, device="cpu"), L, L)
    assert any(isinstance(c.columns, torch.Tensor) for c in streaming)  # sink + window: two key runs


def test_explain_names_the_backend_engine_and_reason():
    q = torch.randn(1, 2, 1024, 16)
    causal = create_block_mask(V.causal(), None, None, 1024, 1024, device="cpu")
    text = explain_backend(q, q, q, None, causal)
    assert "backend: CPU" in text and "engine: sdpa: mask only" in text and "75.0% of Lq x Lkv" in text
    assert "engine: sdpa: additive score_mod 'alibi'" in explain_backend(q, q, q, V.alibi(2), causal)
    assert "engine: fused: score_mod 'tanh_softcap_30' is not additive" in explain_backend(
        q, q, q, V.tanh_softcap(30.0)
    )
    assert "engine: fused: max_scores requested" in explain_backend(q, q, q, max_scores=True)
    assert explain_backend(q.double(), q.double(), q.double()) == "backend: REFERENCE"
    pos = explain_backend(q, q, q, positions=Positions(q_offset=3))
    assert "engine: reference: Positions" in pos
    assert "backend: REFERENCE" in explain_backend(q, q, q, kernel_options={"BACKEND": "REFERENCE"})


def test_positions_run_on_the_reference_with_its_semantics():
    shape = Shape(B=2, Hq=2, Lq=3, Lkv=50, E=16)
    q, k, v = make_qkv(shape, torch.float32)
    mask = create_block_mask(V.causal(), None, None, 50, 50, device="cpu", BLOCK_SIZE=16)
    positions = Positions(
        q_offset=torch.tensor([10, 40], dtype=torch.int32),
        kv_lengths=torch.tensor([13, 50], dtype=torch.int32),
    )
    got = flex_attention(q, k, v, block_mask=mask, positions=positions)
    want, _, _ = reference_attention(q, k, v, None, mask, positions=positions)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_backend_refuses_other_devices_with_a_fix():
    from flexattn.dispatch import choose_backend
    from flexattn.options import KernelOptions

    with pytest.raises(ValueError, match=r"BACKEND': 'CPU'.*needs CPU tensors"):
        choose_backend(torch.device("cuda"), KernelOptions(BACKEND="CPU"), torch.float32)
