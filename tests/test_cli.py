"""The flexattn command: demo (tiny sizes, every variant, CPU), show, and bench (no-GPU refusal, routing)."""

from __future__ import annotations

import json

import pytest
import torch

from flexattn import cli
from flexattn.cli import main
from flexattn.gallery import GALLERY, build_case, element_picture


def test_demo_checks_and_pictures_every_variant(tmp_path, capsys):
    out = tmp_path / "pictures"
    status = main(["demo", "--device", "cpu", "--length", "72", "--block-size", "16", "--out", str(out)])
    table = capsys.readouterr().out
    assert status == 0
    assert "L=72" in table and "blocks of 16" in table
    for name in GALLERY:
        line = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert line.split()[-2] == "yes", line
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.gpu
def test_demo_on_gpu_runs_every_variant_through_the_triton_kernels(tmp_path, capsys):
    status = main(
        [
            "demo",
            "--device",
            "cuda",
            "--length",
            "2000",
            "--batch",
            "2",
            "--heads",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    table = capsys.readouterr().out
    assert "Triton kernels" in table and "bf16" in table
    assert status == 0, table


def test_demo_rejects_unknown_variant(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--variants", "causal,bogus", "--out", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("length", [9, 37])
def test_show_draws_the_mask_element_by_element(length, capsys):
    assert main(["show", "causal", "--length", str(length), "--block-size", "4"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows == ["█" * (i + 1) + "·" * (length - i - 1) for i in range(length)]


@pytest.mark.parametrize("name", list(GALLERY))
def test_show_every_variant_even_at_tiny_lengths(name, capsys):
    for length in (1, 3, 17):
        assert main(["show", name, "--length", str(length)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = sum(1 + build_case(name, length, "cpu").q_len for length in (1, 3, 17))  # title + one per query
    assert len(lines) == rows


def test_show_falls_back_to_blocks_for_long_sequences(capsys):
    assert main(["show", "sliding_window", "--length", "512", "--block-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "sliding_window_64" in out and "one cell per block" in out
    block_rows = out.splitlines()[2:]
    assert len(block_rows) == 512 // 32
    assert block_rows[0].startswith("░░") and block_rows[-1].rstrip().endswith("░░")


def test_show_lists_and_rejects_names(capsys):
    assert main(["show", "--list"]) == 0
    assert "natten_2d" in capsys.readouterr().out
    assert main(["show", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_element_picture_classifies_blocks():
    # causal, 8 tokens, blocks of 4: block (0, 0) partial, (1, 0) full, (0, 1) skipped.
    picture = element_picture(build_case("causal", 8, "cpu"), "cpu", block_size=4)
    assert picture[0, 0] == 2 and picture[0, 1] == 1  # allowed / masked inside a partial block
    assert bool((picture[4:, :4] == 3).all())  # full block
    assert bool((picture[:4, 4:] == 0).all())  # skipped block


def test_bench_without_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, ran",
    [
        (["bench"], {"alpha": [], "beta": []}),
        (["bench", "--quick"], {"alpha": ["--quick"], "beta": ["--quick"]}),
        (["bench", "beta", "--quick", "--write"], {"beta": ["--quick", "--write"]}),
        (["bench", "bench_alpha", "--", "--x"], {"alpha": ["--x"]}),
    ],
    ids=["all", "all-with-options", "one-with-options", "full-name-and-dashdash"],
)
def test_bench_routes_names_and_options_to_benchmark_mains(argv, ran, tmp_path, monkeypatch):
    for name in ("alpha", "beta"):
        (tmp_path / f"bench_{name}.py").write_text(
            "import json, pathlib\n"
            "def main(argv):\n"
            "    pathlib.Path(__file__).with_suffix('.ran').write_text(json.dumps(argv))\n"
        )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path)
    assert main(argv) == 0
    got = {p.stem.removeprefix("bench_"): json.loads(p.read_text()) for p in tmp_path.glob("*.ran")}
    assert got == ran


def test_bench_rejects_unknown_benchmark(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_alpha.py").write_text("def main(argv):\n    pass\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path)
    assert main(["bench", "gamma"]) == 2
    assert "available: alpha" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(cli.BENCHMARKS_DIR.glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_real_benchmark_takes_shared_options_and_refuses_without_gpu(script, monkeypatch):
    """`flexattn bench --quick` hands the same options to every benchmark's main(argv)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = cli._load_script(script)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main(["--quick"])
