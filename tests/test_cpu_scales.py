"""flexattn/cpu/scales.py: constant factors gathered into one multiply, same values to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from flexattn import variants as V
from flexattn.compiler import trace_score_mod
from flexattn.compiler.autodiff import differentiate
from flexattn.compiler.ir import evaluate
from flexattn.cpu.mod_graph import mod_graph
from flexattn.cpu.scales import fold_scales, score_factor


def scales_everywhere(score, b, h, q_idx, kv_idx):
    return -(score * 2.0 - score / 4.0) * 0.5 + torch.sin(score / 3.0) * 3.0


def ratio(score, b, h, q_idx, kv_idx):  # factors on both operands of a product and a quotient
    return (score * 3.0) * (score / 5.0) + (score * 3.0) / (torch.exp(score) * 7.0)


def positions(score, b, h, q_idx, kv_idx):  # int operands and mixed factors are left alone
    return score * 0.5 + (q_idx - kv_idx).float() * 0.25 + (score * 2.0 + 1.0)


def huge(score, b, h, q_idx, kv_idx):  # overflows float32 on its way, as eager does
    return score * 1e30 * 1e30 / 1e30


def zero(score, b, h, q_idx, kv_idx):  # 0 * inf stays nan
    return torch.exp(score * 100.0) * 0.0 + score


MODS = [V.tanh_softcap(30.0), scales_everywhere, ratio, positions, huge, zero]
IDS = ["softcap", "scales_everywhere", "ratio", "positions", "huge", "zero"]


def _ops(graph, outputs):
    return [graph.nodes[i].op for i in graph.live(outputs) if graph.nodes[i].op not in ("const",)]


@pytest.mark.parametrize("mod", MODS, ids=IDS)
def test_folded_graph_computes_the_same_values_and_derivative(mod):
    program = trace_score_mod(mod, torch.device("cpu"))
    graph = program.graph.copy()
    grad = differentiate(graph, program.output, set())  # (appends the derivative to ``graph``)
    outputs = [program.output, grad.dscore]
    folded, new_outputs = fold_scales(graph, outputs)
    inputs = {
        "score": torch.randn(2, 3, 5, 7) * 4,
        "b": torch.arange(2, dtype=torch.int32).view(-1, 1, 1, 1),
        "h": torch.arange(3, dtype=torch.int32).view(1, -1, 1, 1),
        "q_idx": torch.arange(5, dtype=torch.int32).view(1, 1, -1, 1),
        "kv_idx": torch.arange(7, dtype=torch.int32).view(1, 1, 1, -1),
        "dout": torch.randn(2, 3, 5, 7),
    }
    inputs["score"][0, 0, 0, :3] = torch.tensor([0.0, 30.0, -9.0])  # exp(score * 100) = inf there
    want = evaluate(graph, outputs, inputs)
    got = evaluate(folded, new_outputs, inputs)
    for w, g in zip(want, got):
        w, g = torch.broadcast_tensors(w.float(), g.float())
        assert torch.equal(torch.isnan(w), torch.isnan(g)) and torch.equal(torch.isinf(w), torch.isinf(g))
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-6, atol=1e-6)
    assert len(_ops(folded, new_outputs)) <= len(_ops(graph, outputs))


def test_soft_capping_backward_is_three_passes():
    program = trace_score_mod(V.tanh_softcap(30.0), torch.device("cpu"))
    graph = program.graph.copy()
    grad = differentiate(graph, program.output, set())
    before = set(graph.live([grad.dscore])) - set(graph.live([program.output]))
    folded, (output, dscore) = fold_scales(graph, [program.output, grad.dscore])
    after = set(folded.live([dscore])) - set(folded.live([output]))
    passes = [folded.nodes[i].op for i in sorted(after) if folded.nodes[i].op not in ("const", "dout")]
    assert len([i for i in before if graph.nodes[i].op not in ("const", "dout")]) == 5
    assert passes == ["mul", "sub", "mul"]  # t * t, 1 - t*t, dout * (1 - t*t)


def test_a_score_scaled_before_every_use_enters_with_no_multiply():
    """Soft-capping's forward is tanh and one multiply: its 1 / c goes into the engine's q scale."""
    mg = mod_graph(V.tanh_softcap(30.0), torch.device("cpu"))
    assert mg.score_factor == pytest.approx(1 / 30)
    ops = [mg.graph.nodes[i].op for i in mg.forward]
    assert [op for op in ops if op not in ("score", "const")] == ["tanh", "mul"]
    assert mg.graph.nodes[mg.forward[-1]].op == "mul"


@pytest.mark.parametrize("mod", [ratio, positions, scales_everywhere], ids=["ratio", "positions", "two-uses"])
def test_a_score_used_more_ways_than_one_multiply_keeps_factor_one(mod):
    program = trace_score_mod(mod, torch.device("cpu"))
    graph = program.graph.copy()
    grad = differentiate(graph, program.output, set())
    folded, outputs = fold_scales(graph, [program.output, grad.dscore])
    assert score_factor(folded, outputs) == 1.0


def test_folding_in_a_score_factor_keeps_every_output():
    program = trace_score_mod(V.tanh_softcap(7.0), torch.device("cpu"))
    graph = program.graph.copy()
    grad = differentiate(graph, program.output, set())
    outputs = [program.output, grad.dscore]
    folded, outs = fold_scales(graph, outputs)
    c = score_factor(folded, outs)
    refolded, new = fold_scales(folded, outs, c)
    score, dout = torch.randn(4, 9) * 10, torch.randn(4, 9)
    idx = torch.zeros((), dtype=torch.int32)
    base = {"b": idx, "h": idx, "q_idx": idx, "kv_idx": idx, "dout": dout}
    want = evaluate(graph, outputs, {**base, "score": score})
    got = evaluate(refolded, new, {**base, "score": score * c})  # the caller scales the score
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def bucketed(score, b, h, q_idx, kv_idx):  # the tanh decides an integer: exact
    return score + torch.floor(torch.tanh(score) * 4)


def test_fast_tanh_is_a_sigmoid_where_no_bit_depends_on_it():
    cpu = torch.device("cpu")
    fast = mod_graph(V.tanh_softcap(30.0), cpu, fast_tanh=True)
    ops = [fast.graph.nodes[i].op for i in fast.forward]
    assert [op for op in ops if op not in ("score", "const")] == ["sigmoid", "mul", "sub", "mul"]
    assert fast.score_factor == pytest.approx(2 / 30)  # the sigmoid's 2x rides in the query scale
    exact = mod_graph(bucketed, cpu, fast_tanh=True)
    assert "tanh" in [exact.graph.nodes[i].op for i in exact.forward]
    assert "sigmoid" not in [exact.graph.nodes[i].op for i in exact.forward]
    assert mod_graph(V.tanh_softcap(30.0), cpu) is not fast  # (cached apart)


def test_fast_tanh_error_is_absolute_and_small():
    program = trace_score_mod(lambda s, b, h, q, kv: torch.tanh(s), torch.device("cpu"))
    graph = program.graph.copy()
    folded, (out,) = fold_scales(graph, [program.output], approx_tanh={program.output})
    x = torch.cat([torch.linspace(-20, 20, 100_001), torch.tensor([0.0, 1e-30, -1e-8, 88.0, -88.0])])
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    idx = torch.zeros((), dtype=torch.int32)
    (got,) = evaluate(folded, [out], {"score": x, "b": idx, "h": idx, "q_idx": idx, "kv_idx": idx})
    want = torch.tanh(x.double())
    finite = torch.isfinite(x)
    assert (got[finite].double() - want[finite]).abs().max().item() < 3e-7
    assert got[-3].item() == 1.0 and got[-2].item() == -1.0 and torch.isnan(got[-1])
