"""benchmarks/bench_context_parallel.py --dry-run prints each rank's work on any machine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_context_parallel.py"


def test_dry_run_prints_the_plans(capsys):
    spec = importlib.util.spec_from_file_location("bench_context_parallel", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(["--dry-run", "--world-size", "4", "--tokens", "8192", "--mean-doc", "1024"])
    out = capsys.readouterr().out
    assert out.count("ShardPlan zigzag: 8192 tokens on 4 ranks") == 2  # causal and document
    assert "rank 3:" in out and "attention calls per rank" in out
