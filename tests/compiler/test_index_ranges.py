"""Certain out-of-range gathers (compiler/index_ranges.py): exact ranges of position arithmetic.

``attained_range`` must give a range whose both ends some element of the grid takes (so a range
outside the tensor is a certain error), and must give up (None) wherever it could not be sure.
"""

from __future__ import annotations

import pytest
import torch

from flexattn.compiler import ModIndexError, check_mod
from flexattn.compiler.index_ranges import attained_range
from flexattn.compiler.trace import trace

GRID = {"b": 2, "h": 4, "q_idx": 10, "kv_idx": 7}


def _range_of(index):
    def mod(score, b, h, q_idx, kv_idx):
        return score + index(b, h, q_idx, kv_idx).float()

    program = trace(mod, "score")
    add = program.graph.nodes[program.output]
    cast = add.args[1]
    return attained_range(program.graph, program.graph.nodes[cast].args[0], GRID)


@pytest.mark.parametrize(
    "index, want",
    [
        (lambda b, h, q, kv: q, (0, 9)),
        (lambda b, h, q, kv: q - kv, (-6, 9)),
        (lambda b, h, q, kv: kv - q + 9, (0, 15)),
        (lambda b, h, q, kv: -q * 3 + h, (-27, 3)),
        (lambda b, h, q, kv: (q - kv).clamp(-2, 4) + 2, (0, 6)),
        (lambda b, h, q, kv: q // 4 + b * 10, (0, 12)),
        (lambda b, h, q, kv: torch.maximum(q - 5, torch.tensor(0)), (0, 4)),
        (lambda b, h, q, kv: q.long() + 1, (1, 10)),
    ],
)
def test_ranges_of_position_arithmetic_are_exact(index, want):
    assert _range_of(index) == want
    # brute force over the grid: both ends are attained, nothing lies outside
    grid = [torch.arange(n, dtype=torch.int32) for n in GRID.values()]
    b, h, q, kv = torch.meshgrid(*grid, indexing="ij")
    values = index(b, h, q, kv)
    assert (int(values.min()), int(values.max())) == want


@pytest.mark.parametrize(
    "index",
    [
        lambda b, h, q, kv: q - q,  # the same input twice: the ends need not be attained together
        lambda b, h, q, kv: q % 3,
        lambda b, h, q, kv: torch.where(q > kv, q, kv),
        lambda b, h, q, kv: q * kv,
    ],
)
def test_ranges_it_cannot_be_sure_of_are_unknown(index):
    assert _range_of(index) is None


def test_check_mod_refuses_a_certain_out_of_range_gather_and_accepts_wrapped_negatives():
    table = torch.randn(10)
    check_mod(lambda s, b, h, q, kv: s + table[q - kv], "score", (1, 1, 10, 11))  # in [-10, 10)
    with pytest.raises(ModIndexError, match=r"takes values in \[-11, 9\].*must lie in \[-10, 10\)"):
        check_mod(lambda s, b, h, q, kv: s + table[q - kv], "score", (1, 1, 10, 12))
    lookup = torch.randint(0, 50, (10,))
    check_mod(lambda s, b, h, q, kv: s + table[lookup[q]], "score", (1, 1, 10, 10))  # not provable: passes
