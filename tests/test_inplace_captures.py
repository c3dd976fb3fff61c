"""No silent wrong gradient: a learnable tensor captured by a score_mod and changed in place between
the forward and ``backward()`` raises PyTorch's usual in-place error on every backend (both save
the captures for backward, so autograd's version counter check applies), as for any other op.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import flex_attention

BACKENDS = [
    "REFERENCE",
    pytest.param(
        "TRITON",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
        ),
    ),
]


def _attention(backend, bias):
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx]

    return flex_attention(q, k, v, score_mod=head_bias, kernel_options={"BACKEND": backend})


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_change_of_a_learnable_capture_before_backward_raises(backend):
    bias = torch.randn(2, 32, requires_grad=True)
    out = _attention(backend, bias)
    with torch.no_grad():
        bias.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchanged_capture_gets_its_gradient(backend):
    bias = torch.randn(2, 32, requires_grad=True)
    _attention(backend, bias).sum().backward()
    assert bias.grad is not None and bias.grad.shape == bias.shape
