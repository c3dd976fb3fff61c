"""benchmarks/bench_paged.py times on a GPU only; its dry run builds every row's call at tiny sizes on
CPU and checks that paged and contiguous agree (flexattn and torch alike)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_paged.py"


def _load():
    return load_script(_PATH)


def test_dry_run_plans_every_row_and_checks_the_setup(capsys):
    bench = _load()
    assert bench.main(["--dry-run", "--kv", "8k", "--calls", "decode", "--pages", "16", "64"]) == []
    out = capsys.readouterr().out
    assert "KV=8192 decode (Lq=4): flexattn contiguous, flexattn paged 16, flexattn paged 64" in out
    assert "torch paged 64 vs flexattn contiguous" in out


@pytest.mark.parametrize("on_default_device", [True, False], ids=["default-device", "caches-device"])
def test_dry_run_fails_on_a_setup_tensor_that_misses_the_caches_device(monkeypatch, on_default_device):
    """The GPU failure class: a setup tensor made without ``device=`` lands on CPU beside CUDA caches.
    The dry run makes the default device ``meta``, so the same mistake fails on CPU too."""
    bench = _load()
    fill = bench.fill_paged

    def fill_then_reserve_again(paged, B, kv, k, v, k_cache, v_cache, generator):
        fill(paged, B, kv, k, v, k_cache, v_cache, generator)
        device = None if on_default_device else k.device
        # already reserved, so a no-op on the right device
        paged.reserve(torch.tensor([0], device=device), torch.tensor([kv], device=device))

    monkeypatch.setattr(bench, "fill_paged", fill_then_reserve_again)
    args = ["--dry-run", "--kv", "8k", "--calls", "decode", "--pages", "64"]
    if on_default_device:
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            bench.main(args)
    else:
        assert bench.main(args) == []
