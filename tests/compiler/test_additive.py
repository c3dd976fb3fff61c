"""Additive score mods (``score + f(b, h, q, kv)``) fold into the kernels' exp2 (compiler/additive.py).

Which mods are recognised, and that the generated base-2 bias equals ``f * log2(e)`` to fp32
rounding on random index grids. The kernels' results with the fold are checked against float64 by
the zoo and kernel tests (tests/compiler/test_codegen.py, tests/kernels/).
"""

from __future__ import annotations

import math

import pytest
import torch

from flexattn.compiler import _program, compile_score_mod
from flexattn.compiler.additive import additive_term, base2_bias
from flexattn.compiler.ir import evaluate
from flexattn.variants import alibi, tanh_softcap

H, L = 4, 23
TABLE = torch.randn(H, 2 * L - 1)
HEAD_BIAS = torch.randn(H, requires_grad=True)

ADDITIVE = {
    "alibi": alibi(H),
    "relative-table": lambda s, b, h, q, kv: s + TABLE[h, q - kv + L - 1],
    "bias-first": lambda s, b, h, q, kv: HEAD_BIAS[h] + s,
    "constant": lambda s, b, h, q, kv: s + 0.5,
    "position-product": lambda s, b, h, q, kv: s + 0.01 * (q * kv),
    "negated-distance": lambda s, b, h, q, kv: s + -(0.1 * (q - kv).abs()),
}
NOT_ADDITIVE = {
    "identity": lambda s, b, h, q, kv: s,
    "softcap": tanh_softcap(30.0),
    "scaled": lambda s, b, h, q, kv: s * 2.0,
    "score-in-bias": lambda s, b, h, q, kv: s + 0.1 * s,
    "where": lambda s, b, h, q, kv: torch.where(q >= kv, s, s - 1.0),
}


@pytest.mark.parametrize("name", sorted(ADDITIVE))
def test_additive_mods_get_a_bias_equal_to_the_term_times_log2e(name):
    program = _program(ADDITIVE[name], "score", "cpu")
    term = additive_term(program.graph, program.output)
    assert term is not None
    graph = program.graph.copy()
    bias = base2_bias(graph, term)
    grid = {
        "score": torch.zeros(()),
        "b": torch.zeros((), dtype=torch.int32),
        "h": torch.randint(0, H, (3, 1, 1), dtype=torch.int32),
        "q_idx": torch.randint(0, L, (1, 7, 1), dtype=torch.int32),
        "kv_idx": torch.randint(0, L, (1, 1, 9), dtype=torch.int32),
    }
    want, got = evaluate(graph, [term, bias], grid)
    want = want.double() * (1.0 / math.log(2.0))
    assert torch.allclose(got.double(), want, rtol=4e-7, atol=4e-7 * want.abs().max().item()), name
    assert compile_score_mod(ADDITIVE[name], device="cpu").bias_fn is not None


@pytest.mark.parametrize("name", sorted(NOT_ADDITIVE))
def test_other_mods_are_not_folded(name):
    program = _program(NOT_ADDITIVE[name], "score", "cpu")
    assert additive_term(program.graph, program.output) is None
    assert compile_score_mod(NOT_ADDITIVE[name], device="cpu").bias_fn is None


def test_alibi_bias_is_one_subtraction_per_score():
    """The constant lands on the per-head slope and the distance splits into row and column terms."""
    program = _program(alibi(H), "score", "cpu")
    graph = program.graph.copy()
    bias = base2_bias(graph, additive_term(program.graph, program.output))
    node = graph.nodes[bias]
    assert node.op == "sub"
    assert all(graph.nodes[a].op == "mul" for a in node.args)
