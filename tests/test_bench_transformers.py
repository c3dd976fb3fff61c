"""benchmarks/bench_transformers.py: a tiny CPU run fills every row of the table and checks the logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_script

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_transformers.py"


def _load():
    return load_script(_PATH)


def test_a_tiny_cpu_run_measures_flexattn_next_to_sdpa(tmp_path, capsys):
    bench = _load()
    path = tmp_path / "hf.json"
    argv = ["--tiny", "--device", "cpu", "--models", "llama", "--impls", "sdpa", "flexattn",
            "--steps", "1", "--warmup", "0", "--new-tokens", "2", "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0
    assert "| llama | flexattn |" in capsys.readouterr().out
    rows = {row["impl"]: row for row in json.loads(path.read_text())}
    assert rows.keys() == {"sdpa", "flexattn"}
    assert all(row["train_tok_s"] > 0 and row["generate_tok_s"] > 0 for row in rows.values())
    assert rows["flexattn"]["max_logit_diff"] < 1e-4  # fp32 on CPU: the same logits as SDPA
