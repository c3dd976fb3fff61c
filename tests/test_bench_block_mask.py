"""benchmarks/bench_block_mask.py: its plan, and a real run of its CPU mode at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import load_script

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_block_mask.py"


def _load():
    return load_script(_PATH)


def test_plan_runs_every_builder_at_every_size_and_batch(capsys):
    bench = _load()
    args = bench.parse_args(["--sizes", "8k", "1M", "--batch", "1", "8", "--masks", "causal", "document"])
    assert args.sizes == [8192, 1 << 20]
    runs = bench.plan(args)
    assert len(runs) == 2 * 2 * 2 * len(bench.BUILDERS)  # torch eager too: a size it cannot run says so
    fresh = [str(case) for case, _, empty_caches in runs if empty_caches]  # each mask's first row
    assert fresh == ["causal S=8k B=1"] * 4 + ["document S=8k B=1"] * 4
    assert bench.main(["--dry-run", "--sizes", "32k"]) == 0
    assert "sliding_window S=32k B=8  torch-compiled\n" in capsys.readouterr().out


def test_document_cases_pack_a_few_hundred_documents_per_row():
    bench = _load()
    ids = bench._random_doc_ids(2, 1 << 20, "cpu")
    assert ids.shape == (2, 1 << 20) and int(ids[0, -1]) + 1 == 256
    mod = bench.make_mask_mod(bench.Case("document", 1 << 20, 2), "cpu")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    assert bool(mod(i32(1), i32(0), i32(5), i32(3)))


def test_cpu_mode_measures_the_builders_side_by_side(capsys, tmp_path):
    bench = _load()
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--sizes", "256", "300", "--batch", "1", "2", "--masks", "causal", "document"]
    argv += ["--builders", "flexattn", "flexattn+q", "torch-eager", "--reps", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "S=" in line]
    assert len(rows) == 2 * 2 * 2  # one row per (mask, S, B), the builders side by side
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 1 + 3 * 3
        assert all(float(c) > 0 for c in cells[1:4] + cells[7:10]), row  # times and first calls
        assert cells[4:7] == ["n/a"] * 3  # no GPU memory on the CPU
    assert '"error": null' in out.read_text() and '"error": "' not in out.read_text()


def test_a_builder_that_runs_out_of_memory_is_marked_and_the_run_goes_on(capsys, monkeypatch):
    bench = _load()
    real = bench._builder

    def builder(name, device):
        if name != "torch-eager":
            return real(name, device)

        def out_of_memory(mod, B, S):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1024.00 GiB")

        return out_of_memory

    monkeypatch.setattr(bench, "_builder", builder)
    argv = ["--device", "cpu", "--sizes", "256", "--batch", "1", "--masks", "causal", "prefix_lm"]
    assert bench.main(argv + ["--builders", "flexattn", "torch-eager", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "S=" in line]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and cells[2] == "out of memory" and cells[-1] == "out of memory"
