"""The LSE merge: partials over a split of the keys merge into attention over all keys, exactly; rows that
see no key stay out 0 / lse -inf; partial_grads are the merge's own gradients."""

from __future__ import annotations

import math

import torch

from flexattn import create_block_mask, flex_attention
from flexattn.distributed.merge import LseAccumulator, partial_grads
from tests.helpers import rel_err


def test_partials_over_split_keys_merge_into_full_attention():
    B, H, Lq, Lkv, E = 2, 3, 48, 80, 7
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64) for n in (Lq, Lkv, Lkv))
    visible = torch.rand(B, 1, Lq, Lkv) < 0.3
    visible[:, :, :5] = False  # rows that see nothing at all
    mask = create_block_mask(
        lambda b, h, i, j: visible[b, 0, i, j], B, None, Lq, Lkv, device="cpu", BLOCK_SIZE=16
    )
    out, lse = flex_attention(q, k, v, block_mask=mask, return_lse=True)
    acc = LseAccumulator(out.shape, q)
    for a, b in ((0, 16), (16, 48), (48, 80)):  # split of the keys, one partial each
        part = create_block_mask(
            lambda bb, h, i, j, a=a: visible[bb, 0, i, j + a], B, None, Lq, b - a, device="cpu", BLOCK_SIZE=16
        )
        acc.add(*flex_attention(q, k[:, :, a:b], v[:, :, a:b], block_mask=part, return_lse=True))
    assert rel_err(acc.out, out) < 1e-12 and rel_err(acc.lse, lse) < 1e-12
    assert bool((acc.lse[:, :, :5] == -math.inf).all()) and bool((acc.out[:, :, :5] == 0).all())
    assert not bool(acc.out.isnan().any())


def test_partial_grads_are_the_gradients_of_the_merge():
    shape = (2, 3, 11)
    outs = [torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    lses[1][:, :, :4] = -math.inf  # a partial that sees nothing in some rows
    lses = [t.requires_grad_() for t in lses]
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(l - lse)[..., None] * o for o, l in zip(outs, lses))
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad([out, lse], [*outs, *lses], [d_out, d_lse])
    for i in range(3):
        g_out, g_lse = partial_grads(outs[i], lses[i], out.detach(), lse.detach(), d_out, d_lse)
        assert rel_err(g_out, want[i]) < 1e-12 and rel_err(g_lse, want[3 + i]) < 1e-12
