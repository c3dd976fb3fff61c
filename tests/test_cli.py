"""The flexattn command: demo (tiny sizes, every variant, CPU), show, and bench (no-GPU refusal, routing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexattn import cli, gallery
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
    if getattr(module, "CPU_ONLY", False):  # bench_cpu.py measures the CPU path alone
        assert module.parse_args(["--quick"]).quick
        return
    if getattr(module, "RUNS_ON_CPU", False):  # bench_host.py times the CPU path too
        assert module.parse_args(["--quick"]).quick
        with pytest.raises(SystemExit, match="needs a GPU"):
            module.main(["--quick", "--device", "cuda"])
        return
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main(["--quick"])


# ---- errors: one line on stderr, never a traceback ----------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``flexattn ARGV``, whether it returns or exits."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["show", "causal", "--length", "0"], "--length: must be a positive integer, got '0'"),
        (["show", "causal", "--block-size", "x"], "--block-size: must be a positive integer, got 'x'"),
        (["show", "bogus"], "unknown variant 'bogus'. Choose from: noop, causal"),
        (["show"], "name a variant"),
        (["demo", "--length", "-3"], "--length: must be a positive integer, got '-3'"),
        (["demo", "--heads", "0"], "--heads: must be a positive integer"),
        (["demo", "--device", "tpu"], "--device must be cpu or cuda (or cuda:N), got 'tpu'"),
        (["demo", "--variants", "causal,nope"], "unknown variant(s) 'nope'"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["nope"], "invalid choice: 'nope'"),
    ],
    ids=lambda x: "_".join(x) if isinstance(x, list) else None,
)
def test_bad_arguments_give_one_line_and_status_2(argv, says, capsys):
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert says in err and err.startswith("flexattn") and err.count("\n") == 1, err
    assert out == ""


def test_demo_on_cuda_without_a_gpu_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_cli(["demo", "--device", "cuda"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "no CUDA GPU is available" in err and "--device cpu" in err


def test_errors_while_running_are_one_line_unless_a_traceback_is_asked_for(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise ValueError("Q_LEN must be a positive int,\n got 0.")

    monkeypatch.setattr(gallery, "run_demo", boom)
    status, _, err = run_cli(["demo", "--device", "cpu"], capsys)
    assert status == 2
    assert err == (
        "flexattn demo: ValueError: Q_LEN must be a positive int, got 0. "
        "(FLEXATTN_TRACEBACK=1 shows the traceback)\n"
    )
    monkeypatch.setenv("FLEXATTN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="positive int"):
        main(["demo", "--device", "cpu"])


def test_a_fresh_process_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "flexattn.cli", "show", "causal", "--length", "0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "flexattn show: argument --length: must be a positive integer, got '0' (see `flexattn show --help`)"
    ]


# ---- the demo's table ----------------------------------------------------------------------------


def test_demo_header_states_units_and_rows_print_as_they_finish(tmp_path, monkeypatch, capsys):
    printed_before = []  # stdout at the start of each variant

    def fake_run_case(name, case, config, out_dir):
        printed_before.append(capsys.readouterr().out)
        return gallery.DemoRow(name, case.title, 0.0, 0.0, 0.0, True, 1.5, "")

    monkeypatch.setattr(gallery, "_run_case", fake_run_case)
    status = main(["demo", "--device", "cpu", "--variants", "noop,causal", "--out", str(tmp_path)])
    assert status == 0
    header = printed_before[0]
    assert "fwd ms: median milliseconds of one forward call" in header
    assert header.splitlines()[-1].split()[-1] == "ms"  # the column itself: "fwd ms"
    assert printed_before[1].startswith("noop ")  # noop's row was out before causal started
