"""Tracing: the IR means what the eager mod means (dtypes, values, per-element indexing).

Most checks evaluate the traced graph with torch (``ir.evaluate``) and compare with the eager mod
under vmap, so they need no kernels; a property test over random expressions also runs the
generated code through the harness kernel.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flexattn.compiler import compile_score_mod, explain, fast_tanh
from flexattn.compiler.autodiff import differentiate
from flexattn.compiler.ir import evaluate
from flexattn.compiler.proxy import PartialIndex, Traced
from flexattn.compiler.trace import trace
from tests.compiler.harness import eager_score, run_score

M, N = 8, 4


def _tile(Lq=23, Lkv=19):
    score = torch.randn(M, N) * 3
    q_idx = torch.randint(0, Lq, (M,), dtype=torch.int32)
    kv_idx = torch.randint(0, Lkv, (N,), dtype=torch.int32)
    return score, 1, 2, q_idx, kv_idx


def _evaluate(mod, score, b, h, q_idx, kv_idx) -> torch.Tensor:
    program = trace(mod, "score")
    inputs = {
        "score": score,
        "b": torch.tensor(b, dtype=torch.int32),
        "h": torch.tensor(h, dtype=torch.int32),
        "q_idx": q_idx[:, None],
        "kv_idx": kv_idx[None, :],
    }
    (out,) = evaluate(program.graph, [program.output], inputs)
    return out.expand(M, N)


def _traced(expr):
    """The proxy ``expr`` returns when traced (to inspect its dtype)."""
    box = {}

    def mod(score, b, h, q_idx, kv_idx):
        box["value"] = expr(score, b, h, q_idx, kv_idx)
        return score

    trace(mod, "score")
    return box["value"]


PROMOTIONS = {  # id -> expression; its traced dtype must equal eager's on 0-dim tensors
    "int-times-float": lambda s, b, h, q, kv: q * 2.5,
    "int-plus-int": lambda s, b, h, q, kv: q + 3,
    "int-div-int": lambda s, b, h, q, kv: q / kv,
    "int-floordiv": lambda s, b, h, q, kv: q // 2,
    "int-mod": lambda s, b, h, q, kv: q % kv,
    "compare": lambda s, b, h, q, kv: q < 2.5,
    "bool-and": lambda s, b, h, q, kv: (q < 3) & (kv > 1),
    "bool-plus-int": lambda s, b, h, q, kv: (q < 3) + 1,
    "int-pow": lambda s, b, h, q, kv: q**2,
    "int-pow-float": lambda s, b, h, q, kv: q**0.5,
    "exp-of-int": lambda s, b, h, q, kv: torch.exp(q),
    "abs-of-int": lambda s, b, h, q, kv: q.abs(),
    "floor-of-int": lambda s, b, h, q, kv: torch.floor(q),
    "tensor-int64": lambda s, b, h, q, kv: q + torch.tensor(3),
    "tensor-float": lambda s, b, h, q, kv: q + torch.tensor(3.0),
    "half-cast": lambda s, b, h, q, kv: s.half() * 2,
    "half-plus-float": lambda s, b, h, q, kv: s.half() + s,
    "where-scalars": lambda s, b, h, q, kv: torch.where(q > kv, 1, 0),
    "where-mixed": lambda s, b, h, q, kv: torch.where(q > kv, q, 0.5),
    "sigmoid-int": lambda s, b, h, q, kv: torch.sigmoid(kv),
    "zeros-like-int": lambda s, b, h, q, kv: torch.zeros_like(q),
    "logical-not-int": lambda s, b, h, q, kv: torch.logical_not(q),
    "invert-bool": lambda s, b, h, q, kv: ~(q > 1),
    "clamp-int-float": lambda s, b, h, q, kv: torch.clamp(q, 0.5),
}


@pytest.mark.parametrize("name", list(PROMOTIONS))
def test_result_dtypes_follow_torch(name):
    expr = PROMOTIONS[name]
    scalars = (torch.tensor(0.7), torch.tensor(1, dtype=torch.int32), torch.tensor(2, dtype=torch.int32))
    eager = expr(scalars[0], scalars[1], scalars[1], scalars[2], scalars[1])
    assert _traced(expr).dtype == eager.dtype


def test_equal_subexpressions_are_shared():
    def mod(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * (q_idx - kv_idx)

    graph = trace(mod, "score").graph
    assert sum(node.op == "sub" for node in graph.nodes) == 1


def test_partial_indexing_accumulates_indices_per_element():
    intervals = torch.tensor([[0, 5], [3, 9], [7, 12]])
    img = torch.randint(0, 3, (19,))
    seen = []

    def mod(score, b, h, q_idx, kv_idx):
        iv = intervals[img[kv_idx]]
        seen.append(type(iv))
        return torch.where((q_idx >= iv[0]) & (q_idx < iv[1]), score, 0.0)

    tile = _tile()
    torch.testing.assert_close(_evaluate(mod, *tile), eager_score(mod, *tile))
    loads = [n for n in trace(mod, "score").graph.nodes if n.op == "load" and len(n.args) == 2]
    assert len(loads) == 2 and seen[-1] is PartialIndex


def test_constants_fold_and_dead_captures_drop():
    unused = torch.randn(5)

    def mod(score, b, h, q_idx, kv_idx):
        _ = unused[q_idx] * 2
        return score * (torch.tensor(2.0) * 3) + torch.full((), 1.5)

    program = trace(mod, "score")
    assert program.graph.captures == []
    ops = [n.op for n in program.graph.nodes]
    assert ops.count("mul") == 1 and "load" not in ops


def test_mod_returning_a_python_constant():
    tile = _tile()
    for value in (True, 0.25, 3):
        out = _evaluate(lambda s, b, h, q, kv, v=value: v, *tile)
        assert out.dtype == torch.float32 and bool((out == float(value)).all())


def test_fast_tanh_is_torch_tanh_in_eager():
    x = torch.randn(10)
    torch.testing.assert_close(fast_tanh(x), torch.tanh(x), rtol=0, atol=0)
    assert isinstance(_traced(lambda s, b, h, q, kv: fast_tanh(s)), Traced)


def test_explain_shows_ir_and_source():
    bias = torch.randn(3, 20, requires_grad=True)

    def rel(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx]

    text = explain(rel, device="cpu")
    assert "# IR" in text and "capture0(3, 20)[%2, %5]" in text
    assert "@triton.jit" in text and "tl.atomic_add" in text and "def score_mod_" in text
    assert "def mask_mod_" in explain(lambda b, h, q, kv: q >= kv, device="cpu")


# ---- random expressions: IR evaluation and generated code equal eager -----------------------------

_TABLE = torch.randn(4, 40)
_LEAVES = ["s", "q", "kv", "h", "b", "c"]


def _expressions():
    leaf = st.sampled_from(_LEAVES)

    def extend(children):
        unary = st.tuples(
            st.sampled_from(["neg", "abs", "tanh", "sigmoid", "float", "floor", "exp-small"]), children
        )
        binary = st.tuples(
            st.sampled_from(["+", "-", "*", "/", "max", "min", "//3", "%5"]), children, children
        )
        select = st.tuples(st.just("where"), children, children, children)
        gather = st.tuples(st.just("gather"), children)
        return unary | binary | select | gather

    return st.recursive(leaf, extend, max_leaves=8)


def _build(expr, env, c):
    if isinstance(expr, str):
        return torch.tensor(c) if expr == "c" else env[expr]
    op, *args = expr
    x = [_build(a, env, c) for a in args]
    if op == "neg":
        return -x[0]
    if op == "abs":
        return abs(x[0])
    if op == "tanh":
        return torch.tanh(x[0] * 1.0)
    if op == "sigmoid":
        return torch.sigmoid(x[0] * 1.0)
    if op == "float":
        return x[0] * 1.0
    if op == "floor":
        return torch.floor(x[0] * 0.3)
    if op == "exp-small":
        return torch.exp(torch.clamp(x[0] * 1.0, -5, 5))
    if op == "where":
        return torch.where(x[0] > x[1], x[1], x[2])
    if op == "gather":
        return _TABLE[env["h"], (x[0] * 1.0).floor().long() % 40 - 20]  # negative half the time
    if op == "//3":
        return x[0] // 3
    if op == "%5":
        return x[0] % 5
    if op == "/":
        return x[0] / (abs(x[1]) + 1)
    if op == "max":
        return torch.maximum(x[0] * 1.0, x[1] * 1.0)
    if op == "min":
        return torch.minimum(x[0] * 1.0, x[1] * 1.0)
    return {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}[op](*x)


def _mod_from(expr, c):
    def random_mod(score, b, h, q_idx, kv_idx):
        return _build(expr, {"s": score, "q": q_idx, "kv": kv_idx, "h": h, "b": b}, c)

    return random_mod


def _settings(examples: int):
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


@_settings(60)
@given(expr=_expressions(), c=st.sampled_from([2, -3, 0.5, 1.75]))
def test_random_expressions_evaluate_like_eager(expr, c):
    mod = _mod_from(expr, c)
    tile = _tile()
    got, want = _evaluate(mod, *tile), eager_score(mod, *tile)
    torch.testing.assert_close(got, want.expand(M, N).float(), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@_settings(15)
@given(expr=_expressions(), c=st.sampled_from([2, -3, 0.5]))
def test_random_expressions_generate_correct_code(expr, c):
    mod = _mod_from(expr, c)
    tile = _tile()
    got = run_score(compile_score_mod(mod, device="cpu"), *tile)
    want = eager_score(mod, *tile).expand(M, N).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@_settings(50)
@given(expr=_expressions(), c=st.sampled_from([2, -3, 0.5, 1.75]))
def test_random_expression_gradients_match_autograd(expr, c):
    """Reverse-mode AD over the IR (evaluated with torch) equals torch.autograd on the eager mod."""
    mod = _mod_from(expr, c)
    score, b, h, q_idx, kv_idx = _tile()
    dout = torch.randn(M, N)
    program = trace(mod, "score")
    gradient = differentiate(program.graph, program.output, set())
    inputs = {
        "score": score,
        "b": torch.tensor(b, dtype=torch.int32),
        "h": torch.tensor(h, dtype=torch.int32),
        "q_idx": q_idx[:, None],
        "kv_idx": kv_idx[None, :],
        "dout": dout,
    }
    (got,) = evaluate(program.graph, [gradient.dscore], inputs)

    leaf = score.clone().requires_grad_(True)
    out = eager_score(mod, leaf, b, h, q_idx, kv_idx)
    if not out.requires_grad:
        want = torch.zeros(M, N)
    else:
        try:
            (want,) = torch.autograd.grad(out.float(), leaf, dout, allow_unused=True)
        except RuntimeError:  # e.g. floor_divide, which eager autograd cannot differentiate
            assume(False)
        want = torch.zeros(M, N) if want is None else want
    torch.testing.assert_close(got.expand(M, N), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_values_report_the_kernel_device():
    seen = []

    def mod(b, h, q_idx, kv_idx):
        seen.append(q_idx.device)
        return q_idx >= kv_idx

    trace(mod, "mask", device="meta")
    trace(mod, "mask")
    assert seen == [torch.device("meta"), torch.device("cpu")]
