"""benchmarks/bench_cpu.py: a tiny run of every variant, and its SDPA masks mean what flexattn computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexattn import create_block_mask, flex_attention
from tests.helpers import load_script

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"


def _load():
    return load_script(_PATH)


def test_a_tiny_run_prints_every_variant_both_passes(capsys):
    bench = _load()
    assert (
        bench.main(["--sizes", "128", "--repeats", "1", "--batch", "1", "--heads", "2", "--head-dim", "16"])
        == 0
    )
    out = capsys.readouterr().out
    for name in bench.VARIANTS:
        assert f"{name:15s}    128 fwd+bwd" in out
    assert "engine: fused" in out


@pytest.mark.parametrize("name", ["causal", "alibi", "sliding_window", "prefix_lm", "document"])
def test_sdpa_masks_compute_the_variant(name):
    bench = _load()
    L, H = 256, 2
    case = bench.make_case(name, L, H, torch.float32)
    q, k, v = (torch.randn(1, H, L, 16) for _ in range(3))
    mask = create_block_mask(case.mask_mod, None, None, L, L, device="cpu")
    got = flex_attention(q, k, v, score_mod=case.score_mod, block_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=case.sdpa_mask())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
