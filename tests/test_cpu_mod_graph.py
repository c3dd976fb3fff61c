"""flexattn/cpu/mod_graph.py: a score_mod and its derivative from the compiler's IR, run in place,
against vmap + autograd on the same grid (and the fused engine with it against the fp64 gold); an
additive mod's bias from the graph against vmap (bit for bit), and the chunks' masks."""

from __future__ import annotations

import sys

import pytest
import torch

from flexattn import AuxRequest, create_block_mask, flex_attention
from flexattn import variants as V
from flexattn.cpu import fused_engine
from flexattn.cpu.chunk_masks import ChunkMasks
from flexattn.cpu.chunks import plan_chunks
from flexattn.cpu.mod_graph import ModValues, bias_graph, mod_graph
from flexattn.mod_eval import eval_bias, eval_mask_mod, eval_score_mod, index
from flexattn.reference import reference_attention
from tests.helpers import Shape, make_qkv
from tests.test_cpu_fast_path import CPU, _engine, _mask, _three_way

mod_graph_module = sys.modules["flexattn.cpu.mod_graph"]  # (the package's ``mod_graph`` is the function)

BIAS = torch.randn(3)


def square(score, b, h, q_idx, kv_idx):  # one operand twice: mul(x, x) written over x
    return score * score


def branches(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score * 2.0, score - 1.0)


def low_precision(score, b, h, q_idx, kv_idx):
    return (score.to(torch.bfloat16) * 1.5).float() + score


def distance(score, b, h, q_idx, kv_idx):
    return score - (q_idx - kv_idx).float().abs().sqrt() * 0.1 + b + h


def ignores_score(score, b, h, q_idx, kv_idx):
    return kv_idx.float() * 0.01 + h


def gated(score, b, h, q_idx, kv_idx):
    return torch.sigmoid(score) * score + torch.exp(-score.abs())


MODS = [V.tanh_softcap(30.0), square, branches, low_precision, distance, ignores_score, gated]
IDS = ["softcap", "square", "branches", "low_precision", "distance", "ignores_score", "gated"]


@pytest.mark.parametrize("mod", MODS, ids=IDS)
def test_in_place_values_and_derivative_match_vmap_and_autograd(mod):
    B, H, M, N = 2, 3, 5, 7
    raw = torch.randn(B, H, M, N) * 4
    dout = torch.randn(B, H, M, N)
    q, kv = index(3, 3 + M, "cpu"), index(0, N, "cpu")
    x = raw.clone().requires_grad_()
    want = eval_score_mod(mod, x, q, kv).to(torch.float32)
    want_grad = torch.zeros_like(raw)  # (a mod that ignores the score)
    if want.requires_grad:
        (want_grad,) = torch.autograd.grad(want, x, dout)

    mg = mod_graph(mod, torch.device("cpu"))
    assert mg is not None
    grids = (index(0, B, "cpu").view(-1, 1, 1, 1), index(0, H, "cpu").view(1, -1, 1, 1),
             q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1))  # fmt: skip
    scaled = raw * mg.score_factor  # what the engine's matmul gives (the factor is in its q)
    forward_only = ModValues(mg, keep_for_backward=False).modded(scaled.clone(), *grids)
    values = ModValues(mg, keep_for_backward=True)
    got = values.modded(scaled.clone(), *grids)
    got_grad = values.dscore(dout.clone())
    torch.testing.assert_close(forward_only, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    # the compiler's derivative is float32 through bf16 intermediates; eager autograd rounds to bf16
    tol = 2**-7 if mod is low_precision else 1e-5
    torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol * 4)
    assert got.shape == got_grad.shape == raw.shape and got.is_contiguous() and got_grad.is_contiguous()


def test_gathers_and_captures_stay_on_vmap():
    def rel_bias(score, b, h, q_idx, kv_idx):
        return score * BIAS[h]

    assert mod_graph(rel_bias, torch.device("cpu")) is None
    cpu = torch.device("cpu")
    assert mod_graph(V.tanh_softcap(7.0), cpu) is mod_graph(V.tanh_softcap(7.0), cpu)  # cached


@pytest.mark.parametrize("mod", [branches, distance, ignores_score, gated], ids=IDS[2:3] + IDS[4:])
def test_fused_engine_with_the_graph_matches_gold(mod):
    shape = Shape(B=2, Hq=4, Hkv=2, Lq=200, Lkv=170, E=16, Ev=24)
    q = _three_way(shape, torch.float32, mod, _mask(V.causal(), shape, block=32))
    assert _engine(q, mod) == "fused" and mod_graph(mod, q.device) is not None


@pytest.mark.parametrize("mask_mod", [None, V.sliding_window(50)], ids=["unmasked", "sliding"])
def test_fused_engine_in_many_steps_per_chunk_matches_gold(mask_mod, monkeypatch):
    """Chunks cut into several row steps (workspaces reused, dk / dv added per step)."""
    monkeypatch.setattr(fused_engine, "STEP_ELEMENTS", 2000)
    shape = Shape(B=2, Hq=4, Hkv=2, Lq=150, Lkv=170, E=16, Ev=24)
    _three_way(shape, torch.float32, V.tanh_softcap(20.0), _mask(mask_mod, shape, block=32))
    q, k, v = make_qkv(shape, torch.float32)  # no score_mod: max_scores sends it to the fused engine
    block_mask = _mask(mask_mod, shape, block=32)
    out, aux = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=CPU,
                              return_aux=AuxRequest(lse=True, max_scores=True))  # fmt: skip
    gold, _, max_scores = reference_attention(q.double(), k.double(), v.double(), None, block_mask)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.max_scores.double(), max_scores, rtol=1e-5, atol=1e-5)


TABLE = torch.randn(4, 40)  # per head, per relative position
LOOKUP = torch.randint(0, 40, (64,))


def rel_table(score, b, h, q_idx, kv_idx):  # a 2-D gather with a negative index (Python's meaning)
    return score + TABLE[h, q_idx - kv_idx]


def chained(score, b, h, q_idx, kv_idx):  # a gather of a gather, integer arithmetic, a where
    return score + TABLE[h][LOOKUP[q_idx]] * torch.where(kv_idx % 3 == 0, 0.5, (kv_idx // 3).float())


def constant(score, b, h, q_idx, kv_idx):
    return score + 1.5


def per_batch(score, b, h, q_idx, kv_idx):
    return score + b.float() * 0.25


SCALE = torch.tensor(0.7)


def scalar_capture(score, b, h, q_idx, kv_idx):  # the bias is the capture itself: never written over
    return score + SCALE


ADDITIVE = [V.alibi(4), rel_table, chained, constant, per_batch, scalar_capture]
ADDITIVE_IDS = ["alibi", "rel_table", "chained", "constant", "per_batch", "scalar_capture"]


@pytest.mark.parametrize("mod", ADDITIVE, ids=ADDITIVE_IDS)
def test_bias_from_the_graph_equals_vmap_exactly(mod):
    """The sdpa engine's bias (cpu.mod_graph.bias_graph on broadcast grids) is eval_bias's value,
    bit for bit, in every chunk of a causal plan; writing the mask into it leaves captures alone."""
    B, H, L = 2, 4, 40
    block_mask = create_block_mask(V.causal(), None, None, L, L, device="cpu", BLOCK_SIZE=8)
    masks = ChunkMasks(block_mask.mask_mod, mod, B, H, (8, 8), torch.device("cpu"))
    assert masks.bias_graph is not None
    before = SCALE.clone()
    for chunk in plan_chunks(block_mask, L, L, rows=16):
        got, fresh = masks.bias(chunk)
        want = eval_bias(mod, B, H, index(chunk.start, chunk.stop, "cpu"), chunk.kv_positions("cpu"))
        assert torch.equal(got.expand(want.shape), want.to(torch.float32)), chunk
        float_mask, _ = masks.float_mask(chunk, torch.float32)
        dense = masks.mask(chunk)
        expect = want.to(torch.float32) if dense is None else want.to(torch.float32) + dense
        assert torch.equal(float_mask.expand(expect.shape), expect)
    assert torch.equal(SCALE, before)


def test_bias_graph_refuses_learnable_captures_and_non_additive_mods_and_is_cached(monkeypatch):
    learnable = torch.randn(4, requires_grad=True)
    assert bias_graph(lambda s, b, h, q, kv: s + learnable[h], torch.device("cpu")) is None
    assert bias_graph(V.tanh_softcap(3.0), torch.device("cpu")) is None  # not additive
    cpu, alibi, builds = torch.device("cpu"), V.alibi(4), []
    build = mod_graph_module._build_bias
    monkeypatch.setattr(mod_graph_module, "_build_bias", lambda *a: builds.append(a) or build(*a))
    first, second = bias_graph(alibi, cpu), bias_graph(alibi, cpu)
    assert len(builds) == 1 and first.forward == second.forward  # the second from the cache
    assert second.graph.captures[0] is first.graph.captures[0]  # (the mod's own slopes, rebound)


@pytest.mark.parametrize(
    "mask_mod, per_head",
    [(V.causal(), False), (V.sliding_window(11), False), (V.streaming_llm(3, 9), False),
     (lambda b, h, q, kv: (q >= kv) & ((kv + b + h) % 5 != 0), True),
     (lambda b, h, q, kv: (h == 0) | (q - kv <= 7 * b + 3), True)],
    ids=["causal", "sliding", "sink-window", "per-bh-holes", "per-bh-blocks"],
)  # fmt: skip
def test_chunk_masks_equal_the_dense_mask(mask_mod, per_head):
    """Each chunk's additive mask (mask_mod on partial columns only: one run as a view, several as a
    gather; FULL / EMPTY blocks of other (b, h) kept) against the mask_mod over the chunk's keys."""
    B, H, L = 2, 3, 61
    size = (B, H) if per_head else (None, None)
    block_mask = create_block_mask(mask_mod, *size, L, L, device="cpu", BLOCK_SIZE=8)
    masks = ChunkMasks(block_mask.mask_mod, None, B, H, (8, 8), torch.device("cpu"))
    for chunk in plan_chunks(block_mask, L, L, rows=16):
        got = masks.mask(chunk)
        allowed = eval_mask_mod(mask_mod, B, H, index(chunk.start, chunk.stop, "cpu"), chunk.kv_positions("cpu"))
        want = torch.zeros(allowed.shape).masked_fill(~allowed, -float("inf"))
        if got is None:
            assert bool(allowed.all()), chunk
        else:
            assert torch.equal(got.expand(want.shape), want), chunk


def test_a_gather_by_constant_indices_never_writes_into_the_captured_tensor():
    """``table[torch.tensor(3)]`` selects a view of the user's tensor: the graph may not write over it."""
    table = torch.arange(10.0)

    def constant_index(score, b, h, q_idx, kv_idx):
        return score + table[torch.tensor(3)] * 2.0

    shape = Shape(B=1, Hq=2, Lq=64, Lkv=64, E=16)
    q, k, v = make_qkv(shape, torch.float32)
    block_mask = _mask(V.causal(), shape, block=16)
    want = reference_attention(q, k, v, constant_index, block_mask)[0]
    for _ in range(3):
        got = flex_attention(q, k, v, constant_index, block_mask=block_mask, kernel_options=CPU)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(table, torch.arange(10.0))


def test_a_value_that_aliases_its_operand_is_not_written_over():
    """``t.detach()`` is ``t``'s memory: writing ``t.detach() * 2`` over it would change ``t`` too
    (the bias graph of the sdpa engine and the fused engine's graph alike)."""
    shape = Shape(B=1, Hq=2, Lq=50, Lkv=70, E=16)

    def additive(score, b, h, q_idx, kv_idx):
        t = (q_idx - kv_idx).float() * 0.05
        return score + (t.detach() * 2 + t)

    def general(score, b, h, q_idx, kv_idx):
        t = score * 0.5
        return score * torch.sigmoid(t.detach() * 2 + t)

    for mod, engine in ((additive, "sdpa"), (general, "fused")):
        q, k, v = make_qkv(shape, torch.float32)
        want = reference_attention(q.double(), k.double(), v.double(), mod, None)[0]
        got = flex_attention(q, k, v, mod, kernel_options=CPU)
        assert _engine(q, mod) == engine
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_graph_cache_keeps_no_captured_tensor_alive():
    import gc
    import weakref

    table = torch.randn(4, 1 << 12)
    ref = weakref.ref(table)

    def biased(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx]

    q = torch.randn(1, 4, 32, 16)
    flex_attention(q, q, q, biased, kernel_options=CPU)
    assert bias_graph(biased, torch.device("cpu")) is not None  # (cached: its tensors rebound)
    del biased, table
    gc.collect()
    assert ref() is None


def test_index_dtypes_eager_refuses_are_refused_on_the_cpu_path_too():
    table = torch.randn(64)

    def int16_index(score, b, h, q_idx, kv_idx):
        return score + table[kv_idx.to(torch.int16)]

    q = torch.randn(1, 2, 32, 16)
    for backend in ("REFERENCE", "CPU"):
        with pytest.raises(IndexError):
            flex_attention(q, q, q, int16_index, kernel_options={"BACKEND": backend})


def test_a_tensor_made_inside_the_mod_keeps_its_graph_cached(monkeypatch):
    """Only the user's tensors are held weakly: one the trace made (``torch.tensor([...])``) lives
    with the cached graph, so repeat calls do not trace again."""
    builds = []
    build = mod_graph_module._build_bias
    monkeypatch.setattr(mod_graph_module, "_build_bias", lambda *a: builds.append(a) or build(*a))

    def made_inside(score, b, h, q_idx, kv_idx):
        return score + torch.tensor([0.1, 0.2, 0.3, 0.4])[h]

    q = torch.randn(1, 4, 32, 16)
    want = reference_attention(q.double(), q.double(), q.double(), made_inside, None)[0]
    for _ in range(3):
        got = flex_attention(q, q, q, made_inside, kernel_options=CPU)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert len(builds) == 1
