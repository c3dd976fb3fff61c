"""Cases of the ring tests, run inside each gloo rank: the ring result against single-device flex_attention.

Each case builds its global inputs from a seed shared by all ranks, runs single-device
``flex_attention`` (float64, reference backend) and ``ring_flex_attention`` on the rank's shard, and
returns the normalised errors (``tests.helpers.rel_err``) of out, lse and every gradient, with the
calls the ring made and the calls the mask says it must make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexattn import create_block_mask, flex_attention
from flexattn.distributed import (
    RingStats,
    plan_shards,
    ring_flex_attention,
    shard_block_mask,
    shard_sequence,
)
from flexattn.variants import alibi, causal, document_mask, sliding_window
from tests.helpers import rel_err


@dataclass(frozen=True)
class Case:
    name: str
    mask: str  # causal | document | window | padded_documents | full
    score: str  # none | alibi | bias (a learnable captured table)
    strategy: str
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    L: int = 192
    E: int = 17
    Ev: int = 13
    block: int = 16


CASES = {
    c.name: c
    for c in [
        Case("causal-zigzag", "causal", "none", "zigzag"),
        Case("causal-contiguous-bias", "causal", "bias", "contiguous"),
        Case("document-balanced-alibi", "document", "alibi", "balanced", Hkv=4),
        Case("document-zigzag-bias", "document", "bias", "zigzag", B=1, Hq=3, Hkv=1, E=8, Ev=8),
        Case("window-contiguous-alibi", "window", "alibi", "contiguous", block=32, L=256),
        Case("padded-documents-balanced", "padded_documents", "none", "balanced"),
        Case("full-zigzag-bias", "full", "bias", "zigzag", B=1, L=96),
    ]
}


def _doc_ids(B: int, L: int, g: torch.Generator) -> torch.Tensor:
    """(B, L) int32 ascending document ids of random lengths, 7 documents per row."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(L - 1, generator=g)[:6].add(1)
        ids = torch.zeros(L, dtype=torch.int32)
        ids[cuts] = 1
        rows.append(ids.cumsum(0, dtype=torch.int32))
    return torch.stack(rows)


def _mask_mod(case: Case, g: torch.Generator):
    if case.mask == "causal":
        return causal()
    if case.mask == "window":
        return sliding_window(40)
    if case.mask == "full":
        return lambda b, h, q_idx, kv_idx: q_idx >= 0
    inner = document_mask(_doc_ids(case.B, case.L, g), causal())
    if case.mask == "document":
        return inner
    # padding: the last 20-59 query rows of each batch row see nothing (out 0, lse -inf)
    valid = torch.arange(case.L)[None, :] < case.L - torch.randint(20, 60, (case.B, 1), generator=g)
    return lambda b, h, q_idx, kv_idx: inner(b, h, q_idx, kv_idx) & valid[b, q_idx]


def _score_mod(case: Case, g: torch.Generator):
    if case.score == "none":
        return None, None
    if case.score == "alibi":
        return alibi(case.Hq), None
    table = torch.randn(case.Hq, 33, generator=g, dtype=torch.float64).requires_grad_()

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx).abs().clamp(max=32)]

    return relative_bias, table


def run_case(rank: int, world: int, name: str) -> dict:
    case = CASES[name]
    g = torch.Generator().manual_seed(1000 + sum(map(ord, name)))
    mask = create_block_mask(
        _mask_mod(case, g), case.B, None, case.L, case.L, device="cpu", BLOCK_SIZE=case.block
    )
    score_mod, table = _score_mod(case, g)
    shape = dict(dtype=torch.float64)
    q = torch.randn(case.B, case.Hq, case.L, case.E, generator=g, **shape).requires_grad_()
    k = torch.randn(case.B, case.Hkv, case.L, case.E, generator=g, **shape).requires_grad_()
    v = torch.randn(case.B, case.Hkv, case.L, case.Ev, generator=g, **shape).requires_grad_()
    d_out = torch.randn(case.B, case.Hq, case.L, case.Ev, generator=g, **shape)
    d_lse = torch.randn(case.B, case.Hq, case.L, generator=g, **shape)
    gqa = case.Hq != case.Hkv

    out, lse = flex_attention(q, k, v, score_mod, mask, enable_gqa=gqa, return_lse=True)
    gold = _grads(out, lse, d_out, d_lse, q, k, v, table)

    plan = plan_shards(mask, world, case.strategy)
    sharded = shard_block_mask(mask, plan, rank)
    local = [shard_sequence(t.detach(), plan, rank).requires_grad_() for t in (q, k, v)]
    stats = RingStats()
    out_r, lse_r = ring_flex_attention(
        *local, sharded, score_mod=score_mod, enable_gqa=gqa, return_lse=True, stats=stats
    )
    ring = _grads(
        out_r, lse_r, shard_sequence(d_out, plan, rank), shard_sequence(d_lse, plan, rank), *local, table
    )
    if table is not None:
        dist.all_reduce(ring["dtable"])  # each rank holds its queries' share of the table's gradient
    errors = {}
    for key, value in ring.items():
        want = gold[key] if key == "dtable" else shard_sequence(gold[key], plan, rank)
        errors[key] = _err(value, want)
    return {
        "errors": errors,
        "calls": sorted(stats.calls),
        "expected_calls": _expected_calls(mask, plan, rank),
        "pairs": sum(len(pairs) for pairs in sharded.steps),
        "empty_rows": int(torch.isinf(lse_r).sum()),
    }


def _grads(out, lse, d_out, d_lse, q, k, v, table) -> dict:
    wrt = [q, k, v] + ([table] if table is not None else [])
    grads = torch.autograd.grad([out, lse], wrt, [d_out, d_lse])
    result = {"out": out.detach(), "lse": lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if table is not None:
        result["dtable"] = grads[3].clone()
    return result


def _err(actual: torch.Tensor, want: torch.Tensor) -> float:
    """rel_err, plus infinity where the -inf rows differ or a NaN appears."""
    if bool(torch.isnan(actual).any()) or not torch.equal(torch.isinf(actual), torch.isinf(want)):
        return math.inf
    return rel_err(actual, want)


def _expected_calls(mask, plan, rank) -> list[tuple[int, int, int]]:
    """(step, q segment, kv segment) of every pair with a visited block, from the dense global mask."""
    dense = mask.to_dense().flatten(0, 1).any(dim=0)  # (NQ, NKV) visited for some b, h
    q_block, kv_block = mask.BLOCK_SIZE
    calls = []
    for step in range(plan.world_size):
        source = (rank - step) % plan.world_size
        for qi, qs in enumerate(plan.segments[rank]):
            for ki, ks in enumerate(plan.segments[source]):
                rows = slice(qs.start // q_block, qs.stop // q_block)
                cols = slice(ks.start // kv_block, ks.stop // kv_block)
                if bool(dense[rows, cols].any()):
                    calls.append((step, qi, ki))
    return calls


def run_cases(rank: int, world: int, names: list[str]) -> dict:
    return {name: run_case(rank, world, name) for name in names}
