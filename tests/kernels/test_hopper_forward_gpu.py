"""The Gluon Hopper forward through flex_attention on an sm_90 GPU (kernel_options PREFILL_KERNEL='GLUON').

Forcing GLUON raises where the Gluon kernel cannot run, so every call here ran it. Judged by the
three-way rule against the float64 reference (out, lse; gradients of the Triton backward after a
Gluon forward) and against the Triton forward (out, lse, max_scores).
"""

from __future__ import annotations

import pytest
import torch

from flexattn import AuxRequest, create_block_mask, flex_attention
from tests.helpers import DTYPE_IDS, Shape, assert_close_to_gold, gold_and_eager, make_qkv
from tests.kernels.hopper_cases import SM90_GPU, assert_gradients_match, variant

pytestmark = SM90_GPU
GLUON, TRITON = {"PREFILL_KERNEL": "GLUON"}, {"PREFILL_KERNEL": "TRITON"}
_variant = variant


def _run(q, k, v, score_mod, mask, options):
    aux = AuxRequest(lse=True, max_scores=True)
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True, return_aux=aux,
                              kernel_options=options)  # fmt: skip
    return out, aux.lse, aux.max_scores


CASES = [
    ("noop", Shape(2, 4, 1024, 128, Hkv=2), torch.bfloat16),
    ("noop", Shape(2, 4, 4097, 64, Hkv=1), torch.float16),
    ("noop", Shape(1, 6, 1024, 64), torch.bfloat16),  # three consumer warpgroups
    ("causal", Shape(2, 4, 1000, 128, Hkv=2), torch.bfloat16),
    ("causal", Shape(1, 4, 4097, 64), torch.float16),
    ("causal", Shape(1, 4, 700, 128, Lkv=1500), torch.bfloat16),  # Lq != Lkv
    ("sliding", Shape(2, 4, 2048, 64, Hkv=2), torch.bfloat16),
    ("document", Shape(1, 4, 1000, 128, Lkv=1300), torch.bfloat16),
    ("alibi", Shape(1, 8, 1024, 128, Hkv=2), torch.bfloat16),
    ("alibi", Shape(1, 4, 1000, 64), torch.float16),
    ("softcap", Shape(1, 4, 1024, 128), torch.bfloat16),
    ("softcap", Shape(1, 4, 1000, 64, Lkv=777), torch.bfloat16),
    ("late-rows", Shape(1, 2, 1000, 128), torch.bfloat16),
    ("nothing", Shape(1, 2, 300, 64), torch.bfloat16),
]


@pytest.mark.parametrize("name, shape, dtype", CASES, ids=[f"{n}-{s.id}-{DTYPE_IDS[d]}" for n, s, d in CASES])
def test_gluon_forward_matches_the_reference_and_the_triton_forward(name, shape, dtype):
    q, k, v = make_qkv(shape, dtype, "cuda")
    score_mod, mask_mod = _variant(name, shape)
    mask = (
        None
        if mask_mod is None
        else create_block_mask(mask_mod, None, None, shape.Lq, shape.lkv, device="cuda")
    )
    out, lse, max_scores = _run(q, k, v, score_mod, mask, GLUON)
    t_out, t_lse, t_max = _run(q, k, v, score_mod, mask, TRITON)
    kr, vr = (t.repeat_interleave(shape.Hq // shape.hkv, 1) for t in (k, v))  # the reference has no GQA
    gold, eager = gold_and_eager(q, kr, vr, score_mod=score_mod, block_mask=mask)
    assert_close_to_gold(out, gold.out, eager.out, name="out")
    assert_close_to_gold(lse, gold.lse, eager.lse, name="lse")
    assert torch.equal(torch.isinf(lse), torch.isinf(t_lse)) and torch.equal(
        torch.isinf(max_scores), torch.isinf(t_max)
    )
    finite = torch.isfinite(t_lse)
    zero = lse.new_zeros(1)  # rows with no allowed key are not compared (a mask may leave none)
    assert torch.cat([(lse - t_lse)[finite].abs(), zero]).max().item() < 2e-2
    assert torch.cat([(max_scores - t_max)[finite].abs(), zero]).max().item() < 2e-2
    assert (out.float() - t_out.float()).abs().max().item() < 3e-2
    if name in ("late-rows", "nothing"):  # rows with no allowed key: out 0, lse = max = -inf
        assert (~finite).any() and bool((out.float()[~finite] == 0).all())
        assert bool((max_scores[~finite] == -float("inf")).all())


@pytest.mark.parametrize(
    "name, shape", [("causal", Shape(1, 4, 1000, 128, Hkv=2)), ("alibi", Shape(1, 4, 1024, 64))],
    ids=lambda x: x if isinstance(x, str) else x.id,
)  # fmt: skip
def test_the_triton_backward_after_a_gluon_forward(name, shape):
    q, k, v = make_qkv(shape, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, mask_mod = _variant(name, shape)
    mask = create_block_mask(mask_mod, None, None, shape.Lq, shape.lkv, device="cuda")
    assert_gradients_match(q, k, v, shape, score_mod, mask, GLUON, TRITON)
