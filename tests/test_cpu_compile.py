"""torch.compile over flex_attention on CPU (AUTO backend): one graph, no breaks, eager's results.

Traced calls run the reference backend's plain PyTorch (``flexattn.cpu.choice``: the fast path reads
the block tables on the host); the mod checks run once at trace time. Compared with the eager call,
which runs the CPU fast path: forward, lse and the gradients of q, k, v and a learnable table.
"""

from __future__ import annotations

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn import variants as V

B, H, L, E = 2, 2, 40, 16

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def _relative_bias(table):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + L - 1]

    return score_mod


def _call(fn, q, k, v, score_mod, block_mask):
    out, lse = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    return out, lse


def test_fullgraph_compile_on_cpu_with_a_closure_score_mod_and_gradients():
    mask = create_block_mask(V.causal(), B, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(B, H, L, E, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # a new closure over a new table: the graph reads the call's own tensor
        table = torch.randn(H, 2 * L - 1, requires_grad=True)
        results = []
        for fn in (compiled, flex_attention):
            out, lse = _call(fn, q, k, v, _relative_bias(table), mask)
            loss = out.square().sum() + lse.sum()
            results.append((out, lse, *torch.autograd.grad(loss, (q, k, v, table))))
        for name, c, e in zip(("out", "lse", "dq", "dk", "dv", "dtable"), *results):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=name)


def test_dynamo_sees_no_graph_break_on_the_cpu_path():
    mask = create_block_mask(V.sliding_window(8), None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(B, H, L, E, requires_grad=True) for _ in range(3))
    score_mod = _relative_bias(torch.randn(H, 2 * L - 1, requires_grad=True))  # (made outside: custom_ops)

    def step(q, k, v):
        return _call(flex_attention, q, k, v, score_mod, mask)[0].sum()

    explained = torch._dynamo.explain(step)(q, k, v)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("composite", [False, True], ids=["plain", "and_masks-after-a-row-gather"])
def test_changing_ints_reach_the_mods_as_symbolic_ints(composite):
    """A closure over an int that changes between calls (transformers' mask offsets during
    generation) is made symbolic by Dynamo on recompiling: the traced call evaluates the mod on
    broadcast grids (vmap fails on SymInts there) and equals eager at every offset. Also when an
    and_masks composite of the same code indexed a gathered row earlier (vmap is chosen per mod)."""
    from flexattn import and_masks

    if composite:
        spans, image = torch.tensor([[0, 10], [5, 40]]), torch.randint(0, 2, (48,))
        row_gather = and_masks(V.causal(), lambda b, h, q, kv: q >= spans[image[kv]][0])
        create_block_mask(row_gather, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)

    def at_offset(offset):
        def causal_at_offset(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        return and_masks(causal_at_offset) if composite else causal_at_offset

    compiled = torch.compile(flex_attention, backend="aot_eager")
    q_len, kv_len = 16, 48
    q, k, v = torch.randn(1, H, q_len, E), torch.randn(1, H, kv_len, E), torch.randn(1, H, kv_len, E)
    for offset in (3, 17, 32):
        mask = create_block_mask(at_offset(offset), None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=16)
        torch.testing.assert_close(
            compiled(q, k, v, block_mask=mask), flex_attention(q, k, v, block_mask=mask), rtol=1e-5, atol=1e-5
        )


def test_a_gathered_row_indexed_again_compiles_with_eager_semantics():
    """``spans[image[kv_idx]][0]`` and ``table[h][lookup[q_idx]]``: a row of a captured tensor indexed
    again. Broadcast index grids would give the second index the first one's grid dimension, so these
    mods stay on vmap under torch.compile (``compiler.checks.needs_vmap``); one graph, eager's values."""
    spans, image = torch.tensor([[0, 10], [5, 40], [20, L]]), torch.randint(0, 3, (L,))
    table, lookup = torch.randn(H, 2 * L), torch.randint(0, 2 * L, (L,))

    def span_mask(b, h, q_idx, kv_idx):
        span = spans[image[kv_idx]]
        return (q_idx >= span[0]) & (q_idx < span[1])

    def row_bias(score, b, h, q_idx, kv_idx):
        return score + table[h][lookup[q_idx]]

    mask = create_block_mask(span_mask, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    q, k, v = (torch.randn(B, H, L, E, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, flex_attention):
        out, lse = _call(fn, q, k, v, row_bias, mask)
        results.append((out, lse, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, c, e in zip(("out", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=name)
