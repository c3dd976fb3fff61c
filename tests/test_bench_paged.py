"""benchmarks/bench_paged.py times on a GPU only; its dry run builds every row's call at tiny sizes on
CPU and checks that paged and contiguous agree (flexattn and torch alike)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_paged.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_paged", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_row_and_checks_the_setup(capsys):
    bench = _load()
    assert bench.main(["--dry-run", "--kv", "8k", "--calls", "decode", "--pages", "16", "64"]) == []
    out = capsys.readouterr().out
    assert "KV=8192 decode (Lq=4): flexattn contiguous, flexattn paged 16, flexattn paged 64" in out
    assert "torch paged 64 vs flexattn contiguous" in out
