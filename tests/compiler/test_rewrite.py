"""IR rewrites: what they change in the graph, and that the generated code computes the same bits.

``hoist_index_casts`` turns cast(kv_idx - q_idx) -> float32 (an int->float conversion on every
element of the tile) into cast(kv_idx) - cast(q_idx) (conversions on the [M, 1] and [1, N]
vectors, one float subtraction on the tile). The kernel checks run the generated functions through
the harness (Triton's interpreter on CPU, or a GPU) and compare with the eager mod.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn.compiler import compile_score_mod, explain
from flexattn.compiler.analysis import M, N, tile_dims
from flexattn.compiler.rewrite import hoist_index_casts
from flexattn.compiler.trace import trace
from flexattn.variants import alibi, alibi_slopes
from tests.compiler.harness import eager_score, run_grad, run_score
from tests.helpers import assert_close_to_gold

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU",
)
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
ROWS, COLS = 16, 8  # harness tile: query rows x key columns
H = 4


def _rewritten(mod, kind="score"):
    program = trace(mod, kind)
    graph, (output,) = hoist_index_casts(program.graph, [program.output])
    return program, graph, output


# --- what the rewrite does to the graph -----------------------------------------------------------


def test_alibi_converts_the_position_vectors_not_the_tile():
    _, graph, output = _rewritten(alibi(H))
    dims = tile_dims(graph)
    nodes = [graph.nodes[i] for i in graph.live([output])]
    casts = [(graph.nodes[n.args[0]].op, dims[n.args[0]]) for n in nodes if n.op == "cast"]
    assert sorted(casts) == [("kv_idx", {N}), ("q_idx", {M})]
    (sub,) = [n for n in nodes if n.op == "sub"]
    assert sub.dtype == torch.float32 and [graph.nodes[a].op for a in sub.args] == ["cast", "cast"]
    assert not [n for n in nodes if n.op in ("add", "sub") and n.dtype == torch.int32]


def test_explain_and_codegen_see_the_rewritten_graph():
    text = explain(alibi(H), device="cpu")
    assert "float32 = sub(" in text and "int32 = sub(" not in text
    assert "kv_idx.to(tl.float32)" in text and "q_idx.to(tl.float32)" in text


@pytest.mark.parametrize(
    "mod",
    [
        lambda score, b, h, q_idx, kv_idx: (kv_idx + 3) - (q_idx - 5),
        lambda score, b, h, q_idx, kv_idx: (7 + kv_idx) + q_idx,
    ],
    ids=["sub", "add"],
)
def test_positions_plus_constants_are_rewritten(mod):
    _, graph, output = _rewritten(mod)
    op = graph.nodes[output]
    assert op.op in ("add", "sub") and op.dtype == torch.float32
    assert [graph.nodes[a].op for a in op.args] == ["cast", "cast"]
    assert [tile_dims(graph)[graph.nodes[a].args[0]] for a in op.args] in ([{N}, {M}], [{M}, {N}])


STARTS = torch.tensor([0, 3, 7, 12], dtype=torch.int32)


def _gathered_start(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - STARTS[q_idx % 4])


UNCHANGED = {
    "product": lambda score, b, h, q_idx, kv_idx: (q_idx * kv_idx).float(),
    "doubled-position": lambda score, b, h, q_idx, kv_idx: (kv_idx - 2 * q_idx).float(),
    "batch-index": lambda score, b, h, q_idx, kv_idx: (kv_idx - (q_idx + b)).float(),
    "gathered-int": _gathered_start,
    "offset-beyond-2**20": lambda score, b, h, q_idx, kv_idx: (kv_idx - (q_idx + 2**21)).float(),
    "to-float16": lambda score, b, h, q_idx, kv_idx: (kv_idx - q_idx).half(),
    "one-axis-only": lambda score, b, h, q_idx, kv_idx: score + ((q_idx + 4) - q_idx),
    "int-result": lambda score, b, h, q_idx, kv_idx: score + ((kv_idx - q_idx) > 4).float(),
}


@pytest.mark.parametrize("name", list(UNCHANGED))
def test_rewrite_leaves_other_int_arithmetic_alone(name):
    program, graph, output = _rewritten(UNCHANGED[name])
    assert graph.format([output]) == program.graph.format([program.output])


# --- the generated code computes the same values --------------------------------------------------

DISTANCES = {
    "kv-minus-q": lambda score, b, h, q_idx, kv_idx: kv_idx - q_idx,
    "q-minus-kv": lambda score, b, h, q_idx, kv_idx: q_idx - kv_idx,
    "q-plus-kv": lambda score, b, h, q_idx, kv_idx: q_idx + kv_idx,
    "with-offsets": lambda score, b, h, q_idx, kv_idx: (kv_idx + 2**20) - (q_idx - 2**20),
}


def _indices(Lq: int, Lkv: int, low: int = 0):
    q_idx = torch.randint(low, low + Lq, (ROWS,), dtype=torch.int32, device=DEVICE)
    kv_idx = torch.randint(low, low + Lkv, (COLS,), dtype=torch.int32, device=DEVICE)
    return q_idx, kv_idx


def _assert_same_bits(mod, q_idx, kv_idx):
    score = torch.randn(ROWS, COLS, device=DEVICE)
    b, h = 0, int(torch.randint(0, H, ()))
    got = run_score(compile_score_mod(mod, device=DEVICE), score, b, h, q_idx, kv_idx)
    want = eager_score(mod, score, b, h, q_idx, kv_idx).float().expand(ROWS, COLS)
    assert torch.equal(got, want), f"differs at {(got != want).nonzero().tolist()[:5]}"


@needs_kernels
@pytest.mark.parametrize("L", [1, 17, 1000], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("name", list(DISTANCES))
def test_rewritten_distances_are_bit_identical_to_eager(name, L):
    _assert_same_bits(DISTANCES[name], *_indices(L, L))


@needs_kernels
@pytest.mark.parametrize("name", list(DISTANCES))
def test_rewritten_distances_are_exact_up_to_the_documented_bound(name):
    """Positions just below 2**24 - 2**20, offsets of 2**20: sums beyond 2**24 round like eager."""
    _assert_same_bits(DISTANCES[name], *_indices(2**20, 2**20, low=2**24 - 2**21))


@needs_kernels
@pytest.mark.parametrize("L", [1, 17, 1000], ids=lambda L: f"L{L}")
def test_alibi_values_and_gradients_match_eager(L):
    """Learnable slopes: the score, dLoss/dscore and the slopes' gradient against eager autograd."""
    slopes = alibi_slopes(H, device=DEVICE).requires_grad_(True)

    def learnable_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q_idx, kv_idx = _indices(L, L)
    score, dout = torch.randn(2, ROWS, COLS, device=DEVICE)
    b, h = 0, int(torch.randint(0, H, ()))
    kmod = compile_score_mod(learnable_alibi, device=DEVICE)
    assert kmod.grad_captures == (slopes,)

    def eager(dtype):
        s = score.to(dtype).requires_grad_(True)
        out = eager_score(learnable_alibi, s, b, h, q_idx, kv_idx)
        return (out.detach(), *torch.autograd.grad(out, (s, slopes), dout.to(out.dtype)))

    gold, want = eager(torch.float64), eager(torch.float32)
    assert_close_to_gold(run_score(kmod, score, b, h, q_idx, kv_idx), gold[0], want[0], name="score")
    for transposed in (False, True):
        buffer = torch.zeros(H, device=DEVICE)
        dscore = run_grad(kmod, score, b, h, q_idx, kv_idx, dout, (buffer,), transposed=transposed)
        assert_close_to_gold(dscore, gold[1], want[1], name=f"dscore transposed={transposed}")
        assert_close_to_gold(buffer, gold[2], want[2], name=f"dslopes transposed={transposed}")
