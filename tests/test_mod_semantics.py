"""One mod semantics for every backend: each refusal raises the same error class and message on the
reference backend, in ``create_block_mask`` / ``create_mask`` and on the Triton kernels (through
Triton's interpreter on CPU), before any work is done (flexattn.compiler.checks).
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import BlockMask, create_block_mask, create_mask, flex_attention
from flexattn.compiler import ModCompileError, ModIndexError

L = 32
TABLE = torch.randn(L // 2)

BACKENDS = ["REFERENCE", "TRITON"]


def _if_score(score, b, h, q_idx, kv_idx):
    if q_idx > kv_idx:
        return score
    return -score


def _item_score(score, b, h, q_idx, kv_idx):
    return score * q_idx.item()


def _in_place_score(score, b, h, q_idx, kv_idx):
    score += 1
    return score


def _out_of_range_score(score, b, h, q_idx, kv_idx):
    return score + TABLE[q_idx]


def _non_scalar_score(score, b, h, q_idx, kv_idx):
    return score + torch.ones(3)


def _if_mask(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:  # noqa: SIM103 (the Python `if` is the point)
        return True
    return False


def _item_mask(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx.item()


def _out_of_range_mask(b, h, q_idx, kv_idx):
    return TABLE[kv_idx - q_idx + L // 2] > 0


SCORE_REFUSALS = {
    "python-if": (_if_score, ModCompileError, "data-dependent Python control flow"),
    "item": (_item_score, ModCompileError, "converting a traced value to a Python number"),
    "augmented-assignment": (_in_place_score, ModCompileError, "in-place operation"),
    "out-of-range-gather": (_out_of_range_score, ModIndexError, "takes values in [0, 31]"),
    "non-scalar-result": (_non_scalar_score, ModCompileError, "shape (3,) was used as a per-element value"),
}
MASK_REFUSALS = {
    "python-if": (_if_mask, ModCompileError, "data-dependent Python control flow"),
    "item": (_item_mask, ModCompileError, "converting a traced value to a Python number"),
    "out-of-range-gather": (_out_of_range_mask, ModIndexError, "takes values in [-15, 47]"),
}


def _qkv():
    return [torch.randn(1, 2, L, 16) for _ in range(3)]


def _attention(backend, score_mod=None, block_mask=None):
    if backend == "TRITON" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend on CPU needs TRITON_INTERPRET=1")
    q, k, v = _qkv()
    return flex_attention(q, k, v, score_mod, block_mask, kernel_options={"BACKEND": backend})


def _error(call):
    with pytest.raises(Exception) as caught:
        call()
    return type(caught.value), str(caught.value)


def _same_everywhere(calls: dict, error_class, fragment):
    errors = {name: _error(call) for name, call in calls.items()}
    first_class, first_message = next(iter(errors.values()))
    assert first_class is error_class, errors
    assert fragment in first_message and "hint:" in first_message and __file__ in first_message
    for name, (cls, message) in errors.items():
        assert (cls, message) == (first_class, first_message), f"{name} differs:\n{message}\n{first_message}"


def _noop_mask_with(mask_mod):
    num = torch.zeros(1, 1, L // 16, dtype=torch.int32) + L // 16
    idx = torch.arange(L // 16, dtype=torch.int32).expand(1, 1, L // 16, L // 16)
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16, mask_mod=mask_mod, seq_lengths=(L, L))


@pytest.mark.parametrize("name", list(SCORE_REFUSALS))
def test_score_mod_refusals_are_the_same_on_every_backend(name):
    mod, error_class, fragment = SCORE_REFUSALS[name]
    calls = {backend: (lambda backend=backend: _attention(backend, score_mod=mod)) for backend in BACKENDS}
    if os.environ.get("TRITON_INTERPRET") != "1":
        del calls["TRITON"]
    calls["create_mask"] = lambda: create_mask(mod, 1, 2, L, L, device="cpu")
    _same_everywhere(calls, error_class, fragment)


@pytest.mark.parametrize("name", list(MASK_REFUSALS))
def test_mask_mod_refusals_are_the_same_on_every_backend(name):
    mod, error_class, fragment = MASK_REFUSALS[name]
    calls = {"create_block_mask": lambda: create_block_mask(mod, 1, 2, L, L, device="cpu", BLOCK_SIZE=16)}
    calls["create_mask"] = lambda: create_mask(mod, 1, 2, L, L, device="cpu")
    for backend in BACKENDS:
        if backend == "REFERENCE" or os.environ.get("TRITON_INTERPRET") == "1":
            calls[backend] = lambda backend=backend: _attention(backend, block_mask=_noop_mask_with(mod))
    _same_everywhere(calls, error_class, fragment)


def test_block_size_rule_is_the_same_on_every_backend():
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device="cpu", BLOCK_SIZE=(8, 16))
    errors = {
        backend: _error(lambda backend=backend: _attention(backend, block_mask=mask)) for backend in BACKENDS
    }
    if os.environ.get("TRITON_INTERPRET") != "1":
        del errors["TRITON"]
    assert set(errors.values()) == {(ValueError, errors["REFERENCE"][1])}, errors
    assert "Q_BLOCK=8 is not a multiple of 16" in errors["REFERENCE"][1]


@pytest.mark.parametrize("bad", [16.0, "16", (16, 16.0), (16,), None])
def test_block_size_of_the_wrong_type_is_a_clear_error(bad):
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731
    with pytest.raises(
        ValueError, match=r"BLOCK_SIZE must be a positive int or a \(Q_BLOCK, KV_BLOCK\) pair"
    ):
        create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=bad)
    num, idx = torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="BLOCK_SIZE must be a positive int"):
        BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bad)


def test_a_wrapped_negative_index_is_in_range():
    """Negative indices count from the end, as in Python: q_idx - kv_idx over a table of L is valid."""
    table = torch.randn(L)
    for backend in BACKENDS:
        if backend == "TRITON" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        out = _attention(backend, score_mod=lambda s, b, h, q, kv: s + table[q - kv])
        assert out.shape == (1, 2, L, 16)


def test_an_out_of_range_index_known_only_from_tensor_values():
    """Not provable from the shapes: the reference backend and the CPU fast path raise eager's
    IndexError (in the mod's terms); the kernels clamp the index (docs/debugging.md: TRITON_DEBUG=1 asserts instead)."""
    table, lookup = torch.randn(10), torch.full((L,), 12)

    def looked_up(score, b, h, q_idx, kv_idx):
        return score + table[lookup[q_idx]]

    for backend in ("REFERENCE", "CPU"):  # (CPU: the sdpa engine's bias from the graph checks the gather)
        with pytest.raises(IndexError, match=r"looked_up: a gather in the mod reads out of range.*\n  hint: "):
            _attention(backend, score_mod=looked_up)
    if os.environ.get("TRITON_INTERPRET") == "1":
        q, k, v = _qkv()
        got = flex_attention(q, k, v, looked_up, kernel_options={"BACKEND": "TRITON"})
        last = table[-1].item()
        want = flex_attention(
            q, k, v, lambda s, b, h, i, j: s + last, kernel_options={"BACKEND": "REFERENCE"}
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_gathered_row_unpacks_as_in_eager_on_every_backend():
    """``start, end = spans[image[kv_idx]]``: a row of a captured tensor unpacked into its elements
    (the tracer iterates it by the row's length, as eager does; it used to yield a third element)."""
    spans, image = torch.tensor([[0, 9], [4, 20], [12, L]]), torch.randint(0, 3, (L,))

    def unpacked(b, h, q_idx, kv_idx):
        start, end = spans[image[kv_idx]]
        return (q_idx >= start) & (q_idx < end)

    def indexed(b, h, q_idx, kv_idx):
        return (q_idx >= spans[image[kv_idx], 0]) & (q_idx < spans[image[kv_idx], 1])

    def unpacked_bias(score, b, h, q_idx, kv_idx):
        start, end = spans[image[kv_idx]]
        return score + (start - end).float() * 0.01

    def indexed_bias(score, b, h, q_idx, kv_idx):
        return score + (spans[image[kv_idx], 0] - spans[image[kv_idx], 1]).float() * 0.01

    q, k, v = _qkv()
    want = flex_attention(q, k, v, indexed_bias, _noop_mask_with(indexed), kernel_options={"BACKEND": "REFERENCE"})
    for backend in BACKENDS + ["CPU"]:
        if backend == "TRITON" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        mask = create_block_mask(unpacked, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        got = flex_attention(q, k, v, unpacked_bias, mask, kernel_options={"BACKEND": backend})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=backend)
