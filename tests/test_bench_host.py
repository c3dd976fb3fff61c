"""benchmarks/bench_host.py: on CPU it times each implementation's CPU path and writes its rows."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import load_script

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_host.py"


def _load():
    return load_script(_PATH)


def test_the_table_and_json_hold_every_case_and_implementation(tmp_path, capsys):
    bench = _load()
    path = tmp_path / "host.json"
    argv = [
        "--impls",
        "flexattn",
        "sdpa",
        "--calls",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--json",
        str(path),
    ]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "flexattn" in table and "sdpa" in table and "decode" in table and "Lq=1 Lkv=256" in table
    report = json.loads(path.read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["shapes"]["decode"]["q_len"] == 1
    rows = {(r["case"], r["impl"]): r for r in report["rows"]}
    cases = ("noop", "causal", "decode", "decode-8k")
    assert set(rows) == {(c, i) for c in cases for i in ("flexattn", "sdpa")}
    assert all("error" not in r and r["host_us"] > 0 for r in rows.values())


def test_breakdown_lists_the_profile_of_flexattn(capsys):
    bench = _load()
    assert bench.main(["--breakdown", "decode", "--calls", "3", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "cumulative" in out and "flex_attention" in out
