"""Runs examples/train_gpt_packed_cp.py's training loop inside a gloo rank (or on one device)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = dict(n_layer=1, n_head=2, d_model=32, seq_len=128, batch_size=1, min_doc=8, max_doc=48, steps=3)


def load_example():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import train_gpt_packed_cp

    return train_gpt_packed_cp


def train_small(rank: int, world: int, strategy: str, context_parallel: bool = True) -> list[float]:
    example = load_example()
    cfg = example.Config(**SMALL)
    return example.train(
        cfg,
        torch.device("cpu"),
        context_parallel=context_parallel,
        strategy=strategy,
        block=16,
        log=lambda *a: None,
    )
