"""The public API: drop-in parity with torch.nn.attention.flex_attention, return conventions,
backend dispatch, and every input error (each names the argument, the bad value and the fix).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
import torch.nn.functional as F

import flexattn
from flexattn import AuxOutput, AuxRequest, create_block_mask, flex_attention
from flexattn.dispatch import choose_backend
from flexattn.options import KernelOptions
from tests.catalog import CATALOG
from tests.helpers import Shape, make_qkv


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# ---- drop-in parity with PyTorch ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["flex_attention", "create_block_mask", "create_mask", "and_masks", "or_masks", "noop_mask"]
)
def test_signatures_match_pytorch(name):
    ours = inspect.signature(getattr(flexattn, name)).parameters
    theirs = inspect.signature(getattr(torch_flex, name)).parameters
    for param, spec in ours.items():
        if param in theirs and param != "device":  # PyTorch picks the accelerator, we pick CUDA/CPU
            assert (spec.kind, spec.default) == (theirs[param].kind, theirs[param].default), param
    required = [p for p, s in theirs.items() if s.default is inspect.Parameter.empty]
    assert list(ours)[: len(required)] == required


@pytest.mark.parametrize("entry", list(CATALOG), ids=list(CATALOG))
def test_catalog_matches_pytorch_flex_attention_in_float64(entry):
    """The same attention-gym-style mods, unchanged, through PyTorch's eager flex_attention.

    (PyTorch has no CPU backward; gradients are checked against per-element dense attention in
    test_reference.py.)
    """
    B, H, Lq, Lkv = 2, 2, 19, 23
    mods = CATALOG[entry](B, H, Lq, Lkv, "cpu")
    q, k, v = make_qkv(Shape(B=B, Hq=H, Lq=Lq, Lkv=Lkv, E=8), torch.float64)
    ours_mask = theirs_mask = None
    if mods.mask_mod is not None:
        ours_mask = create_block_mask(mods.mask_mod, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=16)
        theirs_mask = torch_flex.create_block_mask(mods.mask_mod, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=16)
        assert torch.equal(ours_mask.to_dense(), theirs_mask.to_dense())
    ours = flex_attention(
        q, k, v, mods.score_mod, ours_mask, return_aux=AuxRequest(lse=True, max_scores=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns that it runs eagerly (unfused) here
        theirs = torch_flex.flex_attention(
            q, k, v, mods.score_mod, theirs_mask, return_aux=torch_flex.AuxRequest(lse=True)
        )
    # A score_mod returning fp32 makes PyTorch's eager softmax and output fp32 (a quirk of its
    # eager path); ours casts the scores back to the compute dtype.
    tol = 1e-6 if entry == "score-ignores-score" else 1e-10
    torch.testing.assert_close(ours[0], theirs[0], rtol=tol, atol=tol, check_dtype=tol == 1e-10)
    torch.testing.assert_close(ours[1].lse, theirs[1].lse, rtol=tol, atol=tol, check_dtype=tol == 1e-10)


def test_accepts_a_block_mask_built_by_pytorch():
    mods = CATALOG["v-document-causal"](1, 2, 40, 40, "cpu")
    theirs = torch_flex.create_block_mask(mods.mask_mod, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=16)
    ours = create_block_mask(mods.mask_mod, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=16)
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=40, E=8), torch.float64)
    torch.testing.assert_close(
        flex_attention(q, k, v, block_mask=theirs), flex_attention(q, k, v, block_mask=ours)
    )


# ---- return conventions and defaults ---------------------------------------------------------------


def test_return_conventions():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=9, Lkv=12, E=8, Ev=4))
    out = flex_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 9, 4)
    out2, lse = flex_attention(q, k, v, return_lse=True)
    assert lse.shape == (1, 2, 9) and lse.dtype == torch.float32
    out3, aux = flex_attention(q, k, v, return_aux=AuxRequest(max_scores=True))
    assert isinstance(aux, AuxOutput) and aux.lse is None and aux.max_scores.shape == (1, 2, 9)
    _, aux_both = flex_attention(q, k, v, return_aux=AuxRequest(lse=True, max_scores=True))
    torch.testing.assert_close(aux_both.lse, lse)
    assert bool((aux_both.max_scores <= lse).all())
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out, out3)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
def test_output_dtype_follows_query_and_lse_is_fp32(dtype):
    q, k, v = make_qkv(Shape(B=1, Hq=1, Lq=5, E=16), dtype)
    out, lse = flex_attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32


def test_defaults_match_sdpa_with_gqa_and_custom_scale():
    q, k, v = make_qkv(Shape(B=2, Hq=6, Hkv=2, Lq=33, Lkv=50, E=16, Ev=24), torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(flex_attention(q, k, v, enable_gqa=True), want)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3)
    torch.testing.assert_close(flex_attention(q, k, v, enable_gqa=True, scale=0.3), want)


def test_backend_reference_option_gives_the_same_result_as_auto_on_cpu():
    q, k, v = make_qkv(Shape(B=1, Hq=2, Lq=17, E=8))
    mask = create_block_mask(causal, None, None, 17, 17, device="cpu", BLOCK_SIZE=16)
    auto = flex_attention(q, k, v, block_mask=mask)
    ref = flex_attention(q, k, v, block_mask=mask, kernel_options={"BACKEND": "REFERENCE"})
    torch.testing.assert_close(auto, ref)


# ---- dispatch --------------------------------------------------------------------------------------


def test_choose_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend(cpu, KernelOptions()) == "CPU"  # the CPU fast path (flexattn/cpu/)
    assert choose_backend(cpu, KernelOptions(), torch.float64) == "REFERENCE"  # the oracle's dtype
    assert choose_backend(cuda, KernelOptions()) == "TRITON"
    assert choose_backend(cuda, KernelOptions(BACKEND="REFERENCE")) == "REFERENCE"


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(Shape(B=1, Hq=1, Lq=4, E=16))
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend(torch.device("cpu"), KernelOptions(BACKEND="TRITON")) == "TRITON"


def test_batch_beyond_the_cuda_grid_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    one = torch.randn(1, 1, 16, 16)
    q = k = v = one.expand(65536, 1, 16, 16)  # no memory: every batch element is the same view
    with pytest.raises(ValueError, match=r"B=65536.*Split the batch"):
        flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON"})


# ---- errors ---------------------------------------------------------------------------------------


def _inputs(**overrides):
    """Valid arguments (B=2, H=4, L=16/24, E=8) with some replaced."""
    q, k, v = make_qkv(Shape(B=2, Hq=4, Lq=16, Lkv=24, E=8))
    args = dict(query=q, key=k, value=v)
    args.update(overrides)
    return args


def _mask(q_len=16, kv_len=24, **kwargs):
    return create_block_mask(causal, None, None, q_len, kv_len, device="cpu", **kwargs)


ERRORS = {
    # id: (overrides, exception, regex the message must match)
    "query-rank": (dict(query=torch.randn(4, 16, 8)), ValueError, r"query must be 4-D .* shape \(4, 16, 8\)"),
    "value-rank": (dict(value=torch.randn(1, 2, 4, 24, 8)), ValueError, "value must be 4-D"),
    "batch": (
        dict(key=torch.randn(3, 4, 24, 8), value=torch.randn(3, 4, 24, 8)),
        ValueError,
        "query B=2, key B=3",
    ),
    "head-dim": (dict(key=torch.randn(2, 4, 24, 16)), ValueError, "query E=8 and key E=16"),
    "kv-length": (
        dict(value=torch.randn(2, 4, 23, 8)),
        ValueError,
        r"key \(H=4, L=24\) and value \(H=4, L=23\)",
    ),
    "kv-heads": (
        dict(value=torch.randn(2, 2, 24, 8)),
        ValueError,
        r"key \(H=4, L=24\) and value \(H=2, L=24\)",
    ),
    "gqa-off": (
        dict(key=torch.randn(2, 2, 24, 8), value=torch.randn(2, 2, 24, 8)),
        ValueError,
        "Hq=4 heads but key/value have Hkv=2. Pass enable_gqa=True",
    ),
    "gqa-indivisible": (
        dict(key=torch.randn(2, 3, 24, 8), value=torch.randn(2, 3, 24, 8), enable_gqa=True),
        ValueError,
        "Hq must be a multiple of Hkv, got Hq=4, Hkv=3",
    ),
    "dtype-mismatch": (
        dict(key=torch.randn(2, 4, 24, 8, dtype=torch.float64)),
        TypeError,
        "share a dtype.*float64",
    ),
    "int-dtype": (
        dict(query=torch.ones(2, 4, 16, 8, dtype=torch.int64)),
        TypeError,
        "query must be fp16.*int64",
    ),
    "device-mismatch": (dict(value=torch.randn(2, 4, 24, 8, device="meta")), ValueError, "one device.*meta"),
    "empty": (dict(query=torch.randn(2, 4, 0, 8)), ValueError, "empty dimension"),
    "score-mod-arity": (dict(score_mod=causal), TypeError, "score_mod must take 5 .* takes 4.*mask_mod"),
    "score-mod-not-callable": (dict(score_mod=1.5), TypeError, "score_mod must be callable"),
    "scale-inf": (dict(scale=math.inf), ValueError, "scale must be finite, got inf"),
    "scale-nan": (dict(scale=math.nan), ValueError, "scale must be finite, got nan"),
    "scale-tensor": (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a Python float"),
    "unknown-option": (
        dict(kernel_options={"BLOCK_Q": 64}),
        ValueError,
        "Unknown kernel_options key 'BLOCK_Q'",
    ),
    "bad-option": (dict(kernel_options={"BACKEND": "CUDA"}), ValueError, "BACKEND.*got 'CUDA'"),
    "lse-and-aux": (
        dict(return_lse=True, return_aux=AuxRequest(lse=True)),
        ValueError,
        "either return_lse=True or return_aux",
    ),
    "aux-type": (dict(return_aux={"lse": True}), TypeError, "return_aux must be an AuxRequest"),
    "mask-type": (dict(block_mask=torch.ones(16, 24, dtype=torch.bool)), TypeError, "flexattn.BlockMask"),
    "mask-lengths": (
        dict(block_mask="short"),
        ValueError,
        r"built for \(Q_LEN, KV_LEN\)=\(16, 16\).*_adjust",
    ),
    "mask-block-size": (dict(block_mask="blocks"), ValueError, r"need \(1, 2\). Rebuild"),
    "mask-batch": (dict(block_mask="batch"), ValueError, r"block_mask has \(B, H\)=\(3, 1\)"),
    "mask-device": (dict(block_mask="meta"), ValueError, "block_mask is on meta.*block_mask.to"),
    "mask-mod-arity": (dict(block_mask="arity"), TypeError, "block_mask.mask_mod must take 4"),
    "option-block-divides": (
        dict(block_mask="default", kernel_options={"BLOCK_M": 256}),
        ValueError,
        "BLOCK_M'\\]=256 must divide",
    ),
}


def _resolve_mask(name):
    if name == "short":
        return _mask(16, 16)
    if name == "blocks":
        bad = _mask()
        bad.BLOCK_SIZE = (16, 16)  # lists 1 x 1 blocks of 128, but claims 16: inconsistent
        return bad
    if name == "batch":
        return create_block_mask(causal, 3, None, 16, 24, device="cpu")
    if name == "meta":
        return _mask().to("meta")
    if name == "arity":
        bad = _mask()
        bad.mask_mod = lambda b, h, q: q >= 0
        return bad
    return _mask()


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_invalid_inputs_raise_clear_errors(case):
    overrides, error, pattern = ERRORS[case]
    if isinstance(overrides.get("block_mask"), str):
        overrides = dict(overrides, block_mask=_resolve_mask(overrides["block_mask"]))
    with pytest.raises(error, match=pattern):
        flex_attention(**_inputs(**overrides))


# ---- docstring examples ----------------------------------------------------------------------------

FOUNDATION_MODULES = ["api", "block_mask", "mask_mods", "mod_eval", "reference", "dispatch"]


@pytest.mark.parametrize("module", FOUNDATION_MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(f"flexattn.{module}")
    names = {"torch": torch, **{name: getattr(flexattn, name) for name in flexattn.__all__}}
    result = doctest.testmod(mod, extraglobs=names, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
