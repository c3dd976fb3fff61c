"""flexattn inside ``torch.compile(fullgraph=True)``: the custom ops, their fake kernels and autograd.

On CPU the kernels run through Triton's interpreter (``BACKEND: TRITON``) and the graph is compiled
with the ``aot_eager`` backend (Dynamo + AOTAutograd, no code generation) to keep the test quick.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import AuxRequest, create_block_mask, flex_attention
from flexattn.custom_ops import attention_op

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

needs_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests need TRITON_INTERPRET=1"
)


class BiasedAttention(torch.nn.Module):
    """A projection, then causal attention with a learnable relative-position bias table."""

    def __init__(self, heads: int, length: int, dim: int, device, options):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, device=device)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(heads, 2 * length - 1, device=device))
        self.mask = create_block_mask(
            lambda b, h, i, j: i >= j,
            None,
            None,
            length,
            length,
            device=device,
            BLOCK_SIZE=16 if device == "cpu" else 128,
        )
        self.options = options

        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + self.bias[h, q_idx - kv_idx + length - 1]

        self.score_mod = relative_bias

    def forward(self, q, k, v):
        out, aux = flex_attention(
            self.proj(q),
            k,
            v,
            self.score_mod,
            self.mask,
            kernel_options=self.options,
            return_aux=AuxRequest(lse=True),
        )
        return out, aux.lse


def _compare_compiled_to_eager(device, backend, shape, dtype):
    B, H, L, E = shape
    model = BiasedAttention(H, L, E, device, {"BACKEND": "TRITON"}).to(dtype)
    q, k, v = (torch.randn(B, H, L, E, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    leaves = (q, k, v, model.bias, model.proj.weight)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend=backend)):
        out, lse = fn(q, k, v)
        grads = torch.autograd.grad(out.float().square().sum() + lse.sum(), leaves)
        results.append((out, lse, *grads))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, eager, compiled in zip(("out", "lse", "dq", "dk", "dv", "dbias", "dweight"), *results):
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol, msg=name)


@needs_kernels
def test_compiled_model_matches_eager_with_learnable_bias():
    _compare_compiled_to_eager("cpu", "aot_eager", (2, 2, 33, 16), torch.float32)


@needs_kernels
def test_compiled_call_without_block_mask_returns_lse():
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))

    def attend(q, k, v):
        return flex_attention(q, k, v, scale=0.5, return_lse=True, kernel_options={"BACKEND": "TRITON"})

    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


GLOBAL_BIAS = torch.nn.Parameter(
    0.1 * torch.randn(2, 33)
)  # read by a score_mod defined inside the compiled fn


@needs_kernels
def test_score_mod_defined_inside_the_compiled_function_reading_a_global_parameter():
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))

    def attend(q, k, v):
        def relative_bias(score, b, h, q_idx, kv_idx):
            return score + GLOBAL_BIAS[h, q_idx - kv_idx + 16]

        return flex_attention(q, k, v, relative_bias, kernel_options={"BACKEND": "TRITON"})

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, GLOBAL_BIAS))))
    for name, eager, compiled in zip(("out", "dq", "dbias"), *results):
        torch.testing.assert_close(compiled, eager, msg=name)


@needs_kernels
def test_custom_op_passes_opcheck():
    """Schema, fake kernel and autograd registration agree with the real kernel (torch.library.opcheck)."""
    from flexattn.custom_ops import register

    L = 17
    bias = torch.randn(2, 2 * L - 1, requires_grad=True)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + L - 1]

    handle = register(relative_bias, None, {"BACKEND": "TRITON"}, torch.device("cpu"), torch.float32)
    q, k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attention_op, (q, k, v, [bias], [], *[None] * 8, 0, 0, 0.25, handle))


@needs_kernels
def test_backward_op_gradients_have_the_strides_its_fake_promises():
    """q/k/v seen through a transpose of (B, L, H, E) storage and a transposed learnable table: the
    real backward op must lay its gradients out as its fake kernel says (what compiled graphs assume)."""
    from flexattn.custom_ops import attention_backward_op, register

    L = 17
    bias = torch.randn(2 * L - 1, 2).t().requires_grad_()  # (2, 2L - 1), not contiguous

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + L - 1]

    handle = register(relative_bias, None, {"BACKEND": "TRITON"}, torch.device("cpu"), torch.float32)
    q, k, v = (torch.randn(1, L, 2, 16).transpose(1, 2) for _ in range(3))  # (1, 2, L, 16), strided
    out, lse, _ = attention_op(q, k, v, [bias.detach()], [], *[None] * 8, 0, 0, 0.25, handle)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    # no grad of the backward
    args = (q, k, v, out, lse, dout, dlse, [bias.detach()], [], *[None] * 8, 0, 0, 0.25, handle)
    torch.library.opcheck(attention_backward_op, args)


def test_reference_backend_still_runs_under_compile():
    """The custom ops serve the Triton backend; the reference backend is traced as plain PyTorch."""
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))

    def attend(q, k, v):
        return flex_attention(
            q, k, v, lambda s, b, h, i, j: s - 0.1 * (i - j).abs(), kernel_options={"BACKEND": "REFERENCE"}
        )

    eager = attend(q, k, v)
    compiled = torch.compile(attend, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(
        torch.autograd.grad(compiled.sum(), q)[0], torch.autograd.grad(eager.sum(), q)[0]
    )


@needs_kernels
@pytest.mark.parametrize(
    "bad_call, message",
    [
        (
            lambda q, k: flex_attention(q, k[:, :2], k[:, :2], kernel_options={"BACKEND": "TRITON"}),
            "enable_gqa",
        ),
        (
            lambda q, k: flex_attention(q, k, k, scale=float("nan"), kernel_options={"BACKEND": "TRITON"}),
            "finite",
        ),
        (
            lambda q, k: flex_attention(q, k, k, kernel_options={"BACKEND": "TRITON", "BLOCK_Q": 64}),
            "BLOCK_Q",
        ),
        (
            lambda q, k: flex_attention(q, k, k, lambda s, b, h: s, kernel_options={"BACKEND": "TRITON"}),
            "score_mod",
        ),
        (
            lambda q, k: flex_attention(
                q.double(), k.double(), k.double(), kernel_options={"BACKEND": "TRITON"}
            ),
            "float64",
        ),
    ],
    ids=["gqa-without-enable_gqa", "nan-scale", "unknown-option", "score_mod-arity", "fp64-on-triton"],
)
def test_compiled_calls_validate_their_arguments(bad_call, message):
    """Under torch.compile the custom-op path checks its inputs as eagerly as the plain path."""
    q, k = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    with pytest.raises(Exception, match=message):
        torch.compile(bad_call, fullgraph=True, backend="aot_eager")(q, k)


@pytest.mark.gpu
def test_compiled_model_matches_eager_gpu():
    _compare_compiled_to_eager("cuda", "inductor", (2, 4, 1000, 64), torch.bfloat16)


def test_fp64_cuda_inputs_on_auto_are_traced_through_the_reference_backend():
    """AUTO sends fp64 to the reference backend under torch.compile too (the kernels have no fp64)."""
    from flexattn.dispatch import check_call

    assert check_call(None, None, None, torch.device("cuda"), torch.float64)[0] == "REFERENCE"
    assert check_call(None, None, None, torch.device("cuda"), torch.bfloat16)[0] == "TRITON"
