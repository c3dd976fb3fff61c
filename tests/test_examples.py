"""examples/train_gpt_packed.py runs end to end on CPU and both runs see the same data and weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flexattn import create_block_mask
from flexattn.variants import causal, document_mask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_gpt_packed.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_gpt_packed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
