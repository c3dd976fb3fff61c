"""benchmarks/bench_block_mask.py runs only on a GPU; here its arguments and plan are checked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_block_mask.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_block_mask", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_plan_covers_sizes_batches_and_skips_eager_on_long_sequences(capsys):
    bench = _load()
    args = bench.parse_args(["--sizes", "8k", "1M", "--batch", "1", "8", "--masks", "causal", "document"])
    assert args.sizes == [8192, 1 << 20]
    runs = bench.plan(args)
    assert len(runs) == 2 * 2 * 2 * 3 - 2 * 2  # no torch eager at 1M
    assert bench.main(["--dry-run", "--sizes", "32k"]) == 0
    assert "sliding_window S=32k B=8  torch-compiled" in capsys.readouterr().out


def test_document_cases_pack_a_few_hundred_documents_per_row():
    bench = _load()
    ids = bench._random_doc_ids(2, 1 << 20, "cpu")
    assert ids.shape == (2, 1 << 20) and int(ids[0, -1]) + 1 == 256
    mod = bench.make_mask_mod(bench.Case("document", 1 << 20, 2), "cpu")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    assert bool(mod(i32(1), i32(0), i32(5), i32(3)))
