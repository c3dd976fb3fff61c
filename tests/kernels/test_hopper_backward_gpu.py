"""The Gluon Hopper backward through flex_attention on an sm_90 GPU (kernel_options BACKWARD_KERNEL='GLUON').

Forcing GLUON raises where the Gluon backward cannot run, so every call here ran it. dq, dk and dv
are judged by the three-way rule against the float64 reference (``tests.helpers``) and against the
Triton backward on the same forward.
"""

from __future__ import annotations

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn import variants as V
from tests.helpers import DTYPE_IDS, Shape, make_qkv
from tests.kernels.hopper_cases import SM90_GPU, assert_gradients_match, assert_reference_gradients, variant

pytestmark = SM90_GPU
GLUON, TRITON = {"BACKWARD_KERNEL": "GLUON"}, {"BACKWARD_KERNEL": "TRITON"}
_variant = variant


CASES = [
    ("noop", Shape(2, 4, 1024, 128, Hkv=2), torch.bfloat16),
    ("noop", Shape(1, 4, 1000, 64, Hkv=1), torch.float16),  # tails in q and kv, GQA 4
    ("causal", Shape(2, 4, 1000, 128, Hkv=2), torch.bfloat16),
    ("causal", Shape(1, 2, 2049, 64), torch.float16),
    ("causal", Shape(1, 4, 700, 128, Lkv=1500), torch.bfloat16),  # Lq != Lkv
    ("sliding", Shape(2, 4, 2048, 64, Hkv=2), torch.bfloat16),
    ("document", Shape(1, 4, 1000, 128, Lkv=1300), torch.bfloat16),
    ("alibi", Shape(1, 8, 1024, 128, Hkv=2), torch.bfloat16),
    ("alibi", Shape(1, 4, 1000, 64), torch.float16),
    ("late-rows", Shape(1, 2, 1000, 128), torch.bfloat16),
    ("noop", Shape(1, 2, 97, 128), torch.bfloat16),  # one partial q tile and one partial kv block
]


@pytest.mark.parametrize("name, shape, dtype", CASES, ids=[f"{n}-{s.id}-{DTYPE_IDS[d]}" for n, s, d in CASES])
def test_gluon_backward_matches_the_reference_and_the_triton_backward(name, shape, dtype):
    q, k, v = make_qkv(shape, dtype, "cuda", requires_grad=True)
    score_mod, mask_mod = _variant(name, shape)
    mask = (
        None
        if mask_mod is None
        else create_block_mask(mask_mod, None, None, shape.Lq, shape.lkv, device="cuda")
    )
    assert_gradients_match(q, k, v, shape, score_mod, mask, GLUON, TRITON)


def test_gluon_backward_refuses_what_it_cannot_run():
    q, k, v = make_qkv(Shape(1, 2, 256, 128), torch.bfloat16, "cuda", requires_grad=True)
    out = flex_attention(q, k, v, score_mod=V.tanh_softcap(20.0), kernel_options=GLUON)
    with pytest.raises(ValueError, match="identity or additive score mods"):
        out.sum().backward()
    mask = create_block_mask(V.causal(), None, None, 256, 256, device="cuda", BLOCK_SIZE=64)
    out = flex_attention(q, k, v, block_mask=mask, kernel_options=GLUON)
    with pytest.raises(ValueError, match="KV_BLOCK must be 128"):
        out.sum().backward()


FORM_CASES = [
    ("noop", Shape(1, 4, 1000, 64, Hkv=2)),
    ("causal", Shape(2, 4, 1024, 64)),
    ("document", Shape(1, 4, 1000, 64, Lkv=1300)),
    ("causal", Shape(1, 4, 1000, 128, Hkv=2)),
    ("alibi", Shape(1, 8, 1024, 128, Hkv=2)),
]


# launcher forms not (yet) the default: dQ tiles staged in shared memory and added by TMA bulk
# reductions of 32- or 64-column boxes; dP's GEMM issued after P (late_dp)
FORMS = {
    "tma32": {"tma_dq": True, "dq_box_cols": 32},
    "tma64": {"tma_dq": True, "dq_box_cols": 64},
    "late-dp": {"late_dp": True},
    "tma64-late-dp": {"tma_dq": True, "dq_box_cols": 64, "late_dp": True},
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name, shape", FORM_CASES, ids=[f"{n}-{s.id}" for n, s in FORM_CASES])
def test_gluon_backward_launcher_forms(name, shape, form):
    from flexattn import AuxRequest
    from flexattn.kernels.hopper.backward_ws import gluon_backward
    from flexattn.options import KernelOptions
    from flexattn.plan import plan_attention

    q, k, v = make_qkv(shape, torch.bfloat16, "cuda", requires_grad=True)
    score_mod, mask_mod = _variant(name, shape)
    mask = (
        None
        if mask_mod is None
        else create_block_mask(mask_mod, None, None, shape.Lq, shape.lkv, device="cuda")
    )
    out, aux = flex_attention(
        q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True)
    )
    plan = plan_attention(
        score_mod, mask, shape.Lq, shape.lkv, shape.E**-0.5, KernelOptions(), q.device, q.dtype
    )
    dout = torch.randn_like(q)
    grads = gluon_backward(
        q.detach(), k.detach(), v.detach(), out.detach(), aux.lse, dout, None, score_mod=plan.score_mod,
        mask_mod=plan.mask_mod, tables=None if plan.dense else plan.backward_tables(), scale=plan.scale,
        **FORMS[form],
    )  # fmt: skip
    assert_reference_gradients(grads, q, k, v, shape, score_mod, mask, dout)
