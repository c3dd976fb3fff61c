"""What the compiler refuses, at trace time, with the user's source line and a hint.

Each refused mod's offending statement is its first body line; the error must name this file and
that line, say what was wrong and give a hint. Tracing needs no kernels, so these run anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexattn.compiler import ModCompileError, compile_mask_mod, compile_score_mod

BIAS = torch.randn(4, 16)
TABLE = torch.randn(16)


def _if_on_score(score, b, h, q_idx, kv_idx):
    if score > 0:
        return score
    return -score


def _python_max(score, b, h, q_idx, kv_idx):
    return max(score, 0.0)


def _python_and(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx and kv_idx >= 0


def _chained_comparison(b, h, q_idx, kv_idx):
    return 0 <= q_idx - kv_idx < 8


def _item(score, b, h, q_idx, kv_idx):
    return score * q_idx.item()


def _int(score, b, h, q_idx, kv_idx):
    return score * int(h)


def _float(score, b, h, q_idx, kv_idx):
    return score + float(q_idx)


def _bool(b, h, q_idx, kv_idx):
    return bool(q_idx > kv_idx)


def _math_exp(score, b, h, q_idx, kv_idx):
    return math.exp(score)


def _range_over_index(score, b, h, q_idx, kv_idx):
    return sum(score for _ in range(q_idx))


def _augmented_assignment(score, b, h, q_idx, kv_idx):
    score += 1.0
    return score


def _in_place_method(score, b, h, q_idx, kv_idx):
    return score.add_(1.0)


def _out_argument(score, b, h, q_idx, kv_idx):
    return torch.add(score, 1.0, out=torch.empty(()))


def _setitem_into_capture(score, b, h, q_idx, kv_idx):
    TABLE[q_idx] = 0.0
    return score


def _nonzero(score, b, h, q_idx, kv_idx):
    return torch.nonzero(score > 0)


def _single_argument_where(score, b, h, q_idx, kv_idx):
    return torch.where(score > 0)


def _boolean_mask_index(score, b, h, q_idx, kv_idx):
    return TABLE[score > 0]


def _unsupported_function(score, b, h, q_idx, kv_idx):
    return torch.lgamma(score)


def _unsupported_method(score, b, h, q_idx, kv_idx):
    return score.logsumexp(0)


def _whole_capture_as_value(score, b, h, q_idx, kv_idx):
    return score + BIAS


def _row_as_value(score, b, h, q_idx, kv_idx):
    return score + BIAS[h]


def _slice_index(score, b, h, q_idx, kv_idx):
    return score + BIAS[:, q_idx]


def _float_index(score, b, h, q_idx, kv_idx):
    return score + TABLE[score]


def _too_many_indices(score, b, h, q_idx, kv_idx):
    return score + TABLE[q_idx, kv_idx]


def _index_a_traced_value(score, b, h, q_idx, kv_idx):
    return score[0]


def _tensor_property(score, b, h, q_idx, kv_idx):
    return score.T


def _bitwise_on_float(score, b, h, q_idx, kv_idx):
    return score & 1


REFUSALS = {  # id -> (mod, kind, words in the message, words in the hint)
    "if-on-traced-value": (_if_on_score, "score", "data-dependent Python control flow", "torch.where"),
    "python-max": (_python_max, "score", "data-dependent Python control flow", "torch.maximum"),
    "python-and": (_python_and, "mask", "data-dependent Python control flow", "&"),
    "chained-comparison": (_chained_comparison, "mask", "chained comparisons", "&"),
    "item": (_item, "score", "`.item()`", "keep it a tensor"),
    "int": (_int, "score", "`int(t)`", "keep it a tensor"),
    "float": (_float, "score", "`float(t)`", "keep it a tensor"),
    "bool": (_bool, "mask", "data-dependent Python control flow", "torch.where"),
    "math-module": (_math_exp, "score", "`math.*`", "torch.exp"),
    "range-over-index": (_range_over_index, "score", "Python number", "keep it a tensor"),
    "augmented-assignment": (_augmented_assignment, "score", "in-place operation", "out of place"),
    "in-place-method": (_in_place_method, "score", "in-place operation (add_)", "out of place"),
    "out-argument": (_out_argument, "score", "in-place operation (add(..., out=...))", "out of place"),
    "setitem-into-capture": (
        _setitem_into_capture,
        "score",
        "in-place operation (__setitem__)",
        "out of place",
    ),
    "nonzero": (_nonzero, "score", "data-dependent output shape", "torch.where(cond, a, b)"),
    "single-argument-where": (_single_argument_where, "score", "data-dependent output shape", "torch.where"),
    "boolean-mask-index": (_boolean_mask_index, "score", "boolean-mask indexing", "torch.where"),
    "unsupported-function": (
        _unsupported_function,
        "score",
        "unsupported function torch.lgamma: the gamma family has no Triton lowering",
        "precompute a table outside the mod",
    ),
    "unsupported-method": (
        _unsupported_method,
        "score",
        "unsupported function torch.Tensor.logsumexp: a mod sees one element",
        "precompute it outside the mod",
    ),
    "whole-capture-as-value": (
        _whole_capture_as_value,
        "score",
        "shape (4, 16) was used as a per-element value",
        "bias[h, q_idx]",
    ),
    "row-as-value": (_row_as_value, "score", "indexed with 1 of its 2 indices", "index every dimension"),
    "slice-index": (_slice_index, "score", "slice(None, None, None)", "index with integers"),
    "float-index": (_float_index, "score", "indexing with a torch.float32 value", ".long()"),
    "too-many-indices": (
        _too_many_indices,
        "score",
        "2 indices for a captured tensor of shape (16,)",
        "indexing",
    ),
    "index-a-traced-value": (
        _index_a_traced_value,
        "score",
        "indexing a per-element value",
        "bias[h, q_idx]",
    ),
    "tensor-property": (_tensor_property, "score", "attribute 'T' of a per-element value", "operators"),
    "bitwise-on-float": (_bitwise_on_float, "score", "torch rejects this operation", "dtypes"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal_names_line_and_hint(name):
    mod, kind, what, hint = REFUSALS[name]
    compile_mod = compile_score_mod if kind == "score" else compile_mask_mod
    with pytest.raises(ModCompileError) as info:
        compile_mod(mod, device="cpu")
    message = str(info.value)
    line = mod.__code__.co_firstlineno + 1
    assert message.startswith(f"{mod.__name__}: "), message
    assert what in message, message
    assert f"{__file__}:{line}\n" in message, message
    hint_line = message.split("hint: ", 1)[1]
    assert hint in hint_line, message


def test_refusal_inside_nested_mod_names_the_inner_line():
    from flexattn import and_masks

    def inner(b, h, q_idx, kv_idx):
        return q_idx.item() > 0

    with pytest.raises(ModCompileError) as info:
        compile_mask_mod(and_masks(lambda b, h, q, kv: q >= kv, inner), device="cpu")
    assert f"{__file__}:{inner.__code__.co_firstlineno + 1}\n" in str(info.value)


def test_captured_tensor_on_another_device_is_refused():
    table = torch.randn(8, device="meta")

    def on_meta(score, b, h, q_idx, kv_idx):
        return score + table[q_idx]

    with pytest.raises(ModCompileError, match="is on meta but the kernels run on cpu"):
        compile_score_mod(on_meta, device="cpu")


@pytest.mark.parametrize("result", [None, (1, 2), "yes"], ids=["none", "tuple", "string"])
def test_mod_must_return_a_value(result):
    with pytest.raises(ModCompileError, match="must return a tensor or a number, got"):
        compile_mask_mod(lambda b, h, q_idx, kv_idx: result, device="cpu")


def test_searchsorted_needs_a_captured_1d_sequence():
    def searches_a_table(b, h, q_idx, kv_idx):
        return torch.searchsorted(BIAS, q_idx) > 0

    with pytest.raises(ModCompileError, match=r"searchsorted/bucketize over Tensor of shape \(4, 16\)"):
        compile_mask_mod(searches_a_table, device="cpu")
