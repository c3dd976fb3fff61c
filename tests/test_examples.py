"""The examples run end to end on CPU: train_gpt_packed.py (every run sees the same data and weights)
and generate.py (every attention implementation generates the same tokens)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from flexattn import create_block_mask
from flexattn.variants import causal, document_mask
from tests.helpers import load_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_gpt_packed.py"


def load_example():
    return load_script(EXAMPLE)


def test_train_gpt_packed_runs_on_cpu(capsys):
    load_example().main(["--device", "cpu", "--steps", "3", "--seq-len", "96", "--batch-size", "2"])
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("train_gpt_packed |"))
    runs = summary.split(" | ")[4:]
    assert [run.split()[0] for run in runs] == ["flexattn", "flexattn-boundaries", "sdpa"]
    losses = [float(run.split("loss ")[1].split(",")[0]) for run in runs]
    assert max(losses) - min(losses) < 1e-3  # same model, data and mask semantics


@pytest.mark.parametrize("block", [16, 64, 128])
def test_block_mask_from_document_boundaries_equals_create_block_mask(block):
    example = load_example()
    cfg = example.Config(seq_len=999, batch_size=3, min_doc=1, max_doc=300)
    _, doc_ids = example.packed_batch(cfg, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    doc_ids = doc_ids[:, :-1]  # (3, 999)
    fast = example.document_causal_block_mask(doc_ids, block)
    slow = create_block_mask(
        document_mask(doc_ids, causal()), 3, None, 999, 999, device="cpu", BLOCK_SIZE=block
    )
    for field in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks"):
        assert torch.equal(getattr(fast, field).expand_as(getattr(slow, field)), getattr(slow, field)), field


def test_packed_batch_documents_fill_the_row():
    example = load_example()
    cfg = example.Config(seq_len=200, batch_size=3, min_doc=5, max_doc=40)
    tokens, doc_ids = example.packed_batch(cfg, torch.Generator().manual_seed(0))
    assert tokens.shape == doc_ids.shape == (3, 201)
    starts = example._doc_starts(doc_ids)
    assert bool((tokens.gather(1, starts) == 0).all())  # every document opens with BOS


# ---- examples/generate.py --------------------------------------------------------------------------

GENERATE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
TINY = ["--device", "cpu", "--batch", "3", "--prompt-lengths", "5-40", "--new-tokens", "5"]


def load_generate():
    return load_script(GENERATE)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_generate_gives_the_same_tokens_with_every_attention_on_cpu(capsys):
    """flexattn (paged, and dense with Positions), SDPA and PyTorch's flex_attention with its
    PagedAttention (eager on CPU: compiling it takes minutes there) over the same mixed-length
    prompts: the same greedy tokens and, in fp32, the same logits, with the host's index tensors
    (eager) and with the device buffers a CUDA graph would capture (static)."""
    with torch.device("meta"):  # a tensor made without naming its device fails, as beside CUDA caches
        rows = load_generate().main(TINY)
    impls = ["sdpa", "flexattn", "flexattn-dense", "torch-flex (eager)"]
    assert [(r.impl, r.mode, r.error) for r in rows] == [
        (impl, mode, None) for impl in impls for mode in ("eager", "static")
    ]
    reference = rows[0].tokens
    assert len(reference) == 3 and all(len(seq) == 5 for seq in reference)
    assert len({tuple(seq) for seq in reference}) == 3  # the prompts lead to different continuations
    for r in rows:
        assert r.tokens == reference, r.impl
        assert (r.agree, r.total) == (15, 15)
        assert r.prefill_logit_diff < 1e-4 and r.step_logit_diff < 1e-4, r.impl
    assert "| flexattn | static |" in capsys.readouterr().out


def test_generate_check_fails_when_decode_misses_the_newest_key(monkeypatch):
    """The comparison can fail: a paged decode that leaves out each sequence's newest key (its own
    token) generates other tokens, and --check (on in fp32) says which run."""
    generate = load_generate()
    kv_caches = sys.modules["kv_caches"]  # (imported by generate.py)
    positions = kv_caches.Positions

    def one_key_short(*, q_offset, kv_lengths):
        return positions(q_offset=q_offset, kv_lengths=kv_lengths - 1)

    monkeypatch.setattr(kv_caches, "Positions", one_key_short)
    with pytest.raises(SystemExit, match="--check: flexattn eager generated other tokens than sdpa eager"):
        generate.main([*TINY, "--impl", "sdpa", "flexattn", "--modes", "eager"])


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels run through TRITON_INTERPRET=1"
)
def test_generate_on_the_kernels_gives_the_tokens_of_sdpa():
    """The same through flexattn's Triton kernels (interpreted): the paged prefill kernel and the
    decode kernel with Positions."""
    args = [*TINY, "--layers", "1", "--new-tokens", "3", "--flexattn-backend", "triton", "--modes", "eager"]
    rows = load_generate().main([*args, "--impl", "sdpa", "flexattn", "flexattn-dense"])
    assert [r.error for r in rows] == [None] * 3
    assert all(r.tokens == rows[0].tokens for r in rows)
    assert max(max(r.prefill_logit_diff, r.step_logit_diff) for r in rows) < 1e-4


def test_the_per_step_masks_read_no_value_back_from_the_device():
    """A step's masks are built from the device ids and the host's document count: no host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoValueReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a value was read back"
            return func(*args, **(kwargs or {}))

    example = load_example()
    cfg = example.Config(seq_len=200, batch_size=2, min_doc=5, max_doc=60)
    _, doc_ids = example.packed_batch(cfg, torch.Generator().manual_seed(0))
    num_docs = int(doc_ids.max()) + 1
    ids = doc_ids[:, :-1]
    with NoValueReads():
        masks = [example.document_causal_block_mask(ids, 16, num_docs=num_docs)]
        mod = document_mask(ids, causal(), num_docs=num_docs)
        masks.append(create_block_mask(mod, 2, None, 200, 200, device="cpu", BLOCK_SIZE=16))
    want = create_block_mask(document_mask(ids, causal()), 2, None, 200, 200, device="cpu", BLOCK_SIZE=16)
    for mask in masks:
        assert torch.equal(mask.to_dense().expand_as(want.to_dense()), want.to_dense())
