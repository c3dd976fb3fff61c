"""Code is generated once per structure: new values, new lengths and fresh closures reuse it.

``codegen_count()`` counts code generations in this process. A key is the IR (Python numbers in
the mod are part of it) plus the dtypes/ranks (and, for score mods, requires_grad) of captures.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn.compiler import cache, codegen_count, compile_mask_mod, compile_score_mod
from flexattn.compiler.analysis import encode_int
from tests.compiler.harness import eager_score, run_score

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def relative_bias_mod(table: torch.Tensor, shift, scale: float = 0.5):
    """A fresh closure over ``table`` each call (as a training loop would build it).

    ``shift`` as a Python int is a constant of the code; as a 0-dim tensor it is a runtime value.
    """

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score * scale + table[h, q_idx - kv_idx + shift]

    return relative_bias


def document_mask(doc_id: torch.Tensor):
    def same_document(b, h, q_idx, kv_idx):
        return (doc_id[b, q_idx] == doc_id[b, kv_idx]) & (q_idx >= kv_idx)

    return same_document


def test_new_values_lengths_and_closures_generate_no_code():
    compile_score_mod(relative_bias_mod(torch.randn(2, 9), torch.tensor(4)), device="cpu")
    compile_mask_mod(document_mask(torch.zeros(1, 5, dtype=torch.int32)), device="cpu")
    before = codegen_count()
    for L in (7, 33, 130):
        H = int(torch.randint(1, 5, ()))
        kmod = compile_score_mod(
            relative_bias_mod(torch.randn(H, 2 * L - 1), torch.tensor(L - 1)), device="cpu"
        )
        sizes = [a for a in kmod.args if isinstance(a, int)][:2]
        assert sizes == [encode_int(H), encode_int(2 * L - 1)]  # sizes travel as runtime arguments
        doc_id = torch.randint(0, 3, (2, L), dtype=torch.int32).sort(-1).values
        compile_mask_mod(document_mask(doc_id), device="cpu")
    assert codegen_count() == before


def test_python_numbers_are_part_of_the_key():
    cache.clear()  # a miss is what is counted: not a hit on a run of this test before (seed sweeps)
    table = torch.randn(2, 9)
    compile_score_mod(relative_bias_mod(table, 4, 0.5), device="cpu")
    before = codegen_count()
    compile_score_mod(relative_bias_mod(table, 4, 0.5), device="cpu")
    assert codegen_count() == before
    compile_score_mod(relative_bias_mod(table, 4, 0.25), device="cpu")
    assert codegen_count() == before + 1


@pytest.mark.parametrize(
    "change",
    ["dtype", "rank", "requires-grad"],
)
def test_capture_dtype_rank_and_grad_are_part_of_the_key(change):
    cache.clear()  # (as above)
    table = torch.randn(3, 9)
    compile_score_mod(relative_bias_mod(table, 4), device="cpu")
    before = codegen_count()
    if change == "dtype":
        other = relative_bias_mod(table.half(), 4)
    elif change == "rank":
        cube = torch.randn(3, 9, 1)
        other = lambda score, b, h, q_idx, kv_idx: score * 0.5 + cube[h, q_idx - kv_idx + 4, 0]
    else:
        other = relative_bias_mod(table.clone().requires_grad_(), 4)
    compile_score_mod(other, device="cpu")
    assert codegen_count() == before + 1


def test_requires_grad_does_not_matter_for_masks():
    doc_id = torch.zeros(1, 8)
    compile_mask_mod(document_mask(doc_id), device="cpu")
    before = codegen_count()
    compile_mask_mod(document_mask(doc_id.clone().requires_grad_()), device="cpu")
    assert codegen_count() == before


def test_same_structure_from_different_source_shares_code():
    compile_mask_mod(lambda b, h, q, kv: (q >= kv) & (q - kv < 64), device="cpu")
    before = codegen_count()

    def sliding_window(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal & (q_idx - kv_idx < 64)

    compile_mask_mod(sliding_window, device="cpu")
    assert codegen_count() == before


@interpreted
def test_cached_code_reads_the_new_values():
    first = relative_bias_mod(torch.randn(2, 9), torch.tensor(4))
    compile_score_mod(first, device="cpu")
    before = codegen_count()
    L = int(torch.randint(20, 40, ()))
    second = relative_bias_mod(torch.randn(3, 2 * L - 1), torch.tensor(L - 1))
    kmod = compile_score_mod(second, device="cpu")
    assert codegen_count() == before
    score = torch.randn(16, 8)
    q_idx = torch.randint(0, L, (16,), dtype=torch.int32)
    kv_idx = torch.randint(0, L, (8,), dtype=torch.int32)
    got = run_score(kmod, score, 0, 2, q_idx, kv_idx)
    torch.testing.assert_close(got, eager_score(second, score, 0, 2, q_idx, kv_idx))


def test_new_lengths_keep_the_kernel_specialization():
    """Triton specializes integers inside tuple arguments (== 1, multiple of 16); the encoded sizes
    and strides of ``KernelMod.args`` look alike for every length, so kernels never recompile."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signatures = set()
    for B, L in ((1, 1), (2, 16), (1, 17), (3, 64)):
        kmod = compile_mask_mod(document_mask(torch.zeros(B, L, dtype=torch.int32)), device="cpu")
        signatures.add(repr(native_specialize_impl(BaseBackend, kmod.args, False, True, True)))
    assert len(signatures) == 1, signatures
