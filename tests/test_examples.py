"""examples/train_gpt_packed.py runs end to end on CPU and both runs see the same data and weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
    assert "flexattn" in summary and "SDPA dense mask" in summary
    flex_loss, sdpa_loss = summary.rsplit("final loss ", 1)[1].split(" vs ")
    assert abs(float(flex_loss) - float(sdpa_loss)) < 1e-3  # same model, data and mask semantics


def test_packed_batch_documents_fill_the_row():
    example = load_example()
    import torch

    cfg = example.Config(seq_len=200, batch_size=3, min_doc=5, max_doc=40)
    tokens, doc_ids = example.packed_batch(cfg, torch.Generator().manual_seed(0))
    assert tokens.shape == doc_ids.shape == (3, 201)
    starts = example._doc_starts(doc_ids)
    assert bool((tokens.gather(1, starts) == 0).all())  # every document opens with BOS
