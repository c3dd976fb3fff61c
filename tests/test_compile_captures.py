"""Under torch.compile every call runs the mods it was given, with that call's captures (issue #18).

Dynamo guards a function passed in by its code object alone, so a re-created closure (a padding mask
per batch, one wrapper over several layers' mods) reaches an already compiled graph. Each test
compiles ``flex_attention`` once (``fullgraph=True``), calls it with mods that differ only in what
they capture, and compares every result with the eager call: forward, lse and gradients. On CPU
the Triton kernels run through the interpreter and the graph through ``aot_eager``; the reference
backend is traced as plain PyTorch.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.custom_ops import register

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)

B, H, L, E = 2, 2, 40, 16
BLOCK = 16  # L = 40: two full blocks and a tail, so masks have partial blocks
TRITON = {"BACKEND": "TRITON"}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture(
    params=[pytest.param("cpu", marks=needs_kernels), pytest.param("cuda", marks=pytest.mark.gpu)]
)
def device(request):
    return request.param


def _inputs(device):
    return [torch.randn(B, H, L, E, device=device, requires_grad=True) for _ in range(3)]


def _run(fn, q, k, v, score_mod, block_mask, leaves=()):
    out, lse = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=TRITON, return_lse=True)
    loss = out.square().sum() + lse.sum()
    grads = torch.autograd.grad(loss, (q, k, v, *leaves))
    return (out, lse, *grads)


def _assert_same(compiled, eager, what):
    for name, c, e in zip(("out", "lse", "dq", "dk", "dv", "dcapture"), compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=f"{what}: {name}")


def _compiled():
    return torch.compile(flex_attention, fullgraph=True, backend="aot_eager")


def _mask(mask_mod, device):
    return create_block_mask(mask_mod, B, None, L, L, device=device, BLOCK_SIZE=BLOCK)


def test_recreated_padding_closures_see_their_own_tensor(device):
    """The issue's reproduction: a new closure per batch over a new padding tensor."""

    def padding_mask(keep):
        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, kv_idx]

        return mask_mod

    q, k, v = _inputs(device)
    compiled = _compiled()
    for masked in (3, 21, 37):  # not multiples of the block size
        keep = torch.ones(B, L, dtype=torch.bool, device=device)
        keep[:, :masked] = False
        block_mask = _mask(padding_mask(keep), device)
        _assert_same(
            _run(compiled, q, k, v, None, block_mask), _run(flex_attention, q, k, v, None, block_mask), masked
        )


def test_one_wrapper_over_different_inner_mods(device):
    """``wrap(causal)`` then ``wrap(sliding)`` (Qwen2 / Gemma2 layers through transformers' wrapper)."""

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 7)

    def wrap(inner):
        def mask_mod(b, h, q_idx, kv_idx):
            return inner(b, h, q_idx, kv_idx)

        return mask_mod

    q, k, v = _inputs(device)
    compiled = _compiled()
    for inner in (causal, sliding, causal, sliding):
        block_mask = _mask(wrap(inner), device)
        _assert_same(
            _run(compiled, q, k, v, None, block_mask),
            _run(flex_attention, q, k, v, None, block_mask),
            inner.__name__,
        )


def test_new_python_constants_recompile(device):
    """Closures over new ints and floats (a window, a slope) are new constants, never the old ones."""

    def window_mask(window):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx).abs() <= window

        return mask_mod

    def slope_mod(slope):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slope * (q_idx - kv_idx).abs()

        return score_mod

    q, k, v = _inputs(device)
    compiled = _compiled()
    for window, slope in ((3, 0.5), (9, 0.5), (9, 2.0)):  # a new window, then a new slope alone
        block_mask = _mask(window_mask(window), device)
        score_mod = slope_mod(slope)
        _assert_same(
            _run(compiled, q, k, v, score_mod, block_mask),
            _run(flex_attention, q, k, v, score_mod, block_mask),
            f"window={window} slope={slope}",
        )


def test_score_mod_closures_over_new_learnable_tables(device):
    """A new bias table per call: its values reach the kernels and its gradient comes back."""

    def relative_bias(table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + L - 1]

        return score_mod

    q, k, v = _inputs(device)
    compiled = _compiled()
    for scale in (0.1, 3.0):
        table = (scale * torch.randn(H, 2 * L - 1, device=device)).requires_grad_()
        score_mod = relative_bias(table)
        _assert_same(
            _run(compiled, q, k, v, score_mod, None, (table,)),
            _run(flex_attention, q, k, v, score_mod, None, (table,)),
            f"table x{scale}",
        )


def test_captured_tensors_changed_in_place_between_compiled_calls(device):
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    bias = torch.zeros(H, device=device, requires_grad=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    q, k, v = _inputs(device)
    compiled = _compiled()
    block_mask = _mask(mask_mod, device)
    for step in range(3):
        with torch.no_grad():
            keep[:, : 5 + 9 * step] = False
            bias.add_(torch.randn_like(bias))
        block_mask = _mask(mask_mod, device)  # the block lists follow the mask; the mod is the same object
        _assert_same(
            _run(compiled, q, k, v, score_mod, block_mask, (bias,)),
            _run(flex_attention, q, k, v, score_mod, block_mask, (bias,)),
            f"step {step}",
        )


def test_reference_backend_closure_score_mod_with_grad_under_compile():
    """The CPU path under torch.compile: a closure score_mod over a learnable table, new per call."""

    def relative_bias(table):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + L - 1]

        return score_mod

    q, k, v = (torch.randn(B, H, L, E, requires_grad=True) for _ in range(3))
    compiled = torch.compile(flex_attention, backend="aot_eager")
    for _ in range(2):
        table = torch.randn(H, 2 * L - 1, requires_grad=True)
        score_mod = relative_bias(table)
        results = []
        for fn in (compiled, flex_attention):
            out = fn(q, k, v, score_mod=score_mod, kernel_options={"BACKEND": "REFERENCE"})
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, table))))
        for name, c, e in zip(("out", "dq", "dk", "dv", "dtable"), *results):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=name)


@needs_kernels
def test_registry_handles_follow_structure_not_identity():
    """The custom-op registry: equal structure and values share a handle; a new constant does not;
    a new tensor with the same structure shares it (tensors are graph inputs, not part of the key)."""

    def window_mask(window, table):
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx <= window) & table[kv_idx]

        return mask_mod

    table = torch.ones(L, dtype=torch.bool)
    device = torch.device("cpu")

    def handle(mask_mod):
        return register(None, mask_mod, TRITON, device, torch.float32)

    first = handle(window_mask(4, table))
    assert handle(window_mask(4, torch.zeros(L, dtype=torch.bool))) == first
    assert handle(window_mask(5, table)) != first
    assert handle(window_mask(4.0, table)) != first  # 4 and 4.0 trace differently


def test_computed_tensor_in_a_mod_is_refused_under_compile():
    """A tensor made while the mod runs would be frozen into the graph with its first value."""
    lengths = torch.tensor([10, 30])

    def doc_mask(b, h, q_idx, kv_idx):
        ends = lengths.cumsum(0)  # computed inside the mod
        return (q_idx < ends[0]) == (kv_idx < ends[0])

    compile_mask_mod(doc_mask)  # eager compile is fine
    with pytest.raises(ValueError, match="computes while it runs"):
        register(None, doc_mask, {"BACKEND": "TRITON"}, torch.device("cpu"), torch.float32)
    assert compile_score_mod(None).captures == ()
