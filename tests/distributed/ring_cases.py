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
    gather_sequence,
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
    recompute: bool = False  # ring_flex_attention(recompute=...)
    schedule: str = "ring"  # ring_flex_attention(schedule=...)


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
        Case("causal-zigzag-recompute", "causal", "alibi", "zigzag", recompute=True),
        Case("document-balanced-bias-direct", "document", "bias", "balanced", schedule="direct"),
        Case(
            "window-contiguous-direct-recompute",
            "window",
            "alibi",
            "contiguous",
            block=32,
            L=256,
            schedule="direct",
            recompute=True,
        ),
        Case(
            "padded-documents-bias-recompute", "padded_documents", "bias", "balanced", Hkv=1, recompute=True
        ),
        Case("document-zigzag-bias-small", "document", "bias", "zigzag", B=1, Hq=2, Hkv=1, L=64, E=16, Ev=16),
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


def _mask_mod(case: Case, g: torch.Generator, device):
    if case.mask == "causal":
        return causal()
    if case.mask == "window":
        return sliding_window(40)
    if case.mask == "full":
        return lambda b, h, q_idx, kv_idx: q_idx >= 0
    inner = document_mask(_doc_ids(case.B, case.L, g).to(device), causal())
    if case.mask == "document":
        return inner
    # padding: the last 20-59 query rows of each batch row see nothing (out 0, lse -inf)
    valid = torch.arange(case.L)[None, :] < case.L - torch.randint(20, 60, (case.B, 1), generator=g)
    valid = valid.to(device)
    return lambda b, h, q_idx, kv_idx: inner(b, h, q_idx, kv_idx) & valid[b, q_idx]


def _score_mod(case: Case, table: torch.Tensor | None):
    if case.score == "none":
        return None
    if case.score == "alibi":
        return alibi(case.Hq, device=None if table is None else table.device)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx).abs().clamp(max=32)]

    return relative_bias


class _Problem:
    """One case's global inputs and mods on one device, in one dtype (the same values everywhere)."""

    def __init__(self, case: Case, device, dtype, backend: str | None = None):
        g = torch.Generator().manual_seed(1000 + sum(map(ord, case.name)))
        self.mask = create_block_mask(
            _mask_mod(case, g, device), case.B, None, case.L, case.L, device=device, BLOCK_SIZE=case.block
        )
        table = torch.randn(case.Hq, 33, generator=g, dtype=torch.float64)
        self.table = table.to(device, dtype).requires_grad_() if case.score == "bias" else None
        self.score_mod = _score_mod(case, self.table if case.score == "bias" else table.to(device))
        tensors = [
            torch.randn(case.B, case.Hq, case.L, case.E, generator=g, dtype=torch.float64),
            torch.randn(case.B, case.Hkv, case.L, case.E, generator=g, dtype=torch.float64),
            torch.randn(case.B, case.Hkv, case.L, case.Ev, generator=g, dtype=torch.float64),
        ]
        self.q, self.k, self.v = (t.to(device, dtype).requires_grad_() for t in tensors)
        self.d_out = torch.randn(case.B, case.Hq, case.L, case.Ev, generator=g, dtype=torch.float64)
        self.d_lse = torch.randn(case.B, case.Hq, case.L, generator=g, dtype=torch.float64)
        self.d_out, self.d_lse = self.d_out.to(device, dtype), self.d_lse.to(device, torch.float32)
        self.gqa = case.Hq != case.Hkv
        self.options = None if backend is None else {"BACKEND": backend}

    def single_device(self) -> dict:
        out, lse = flex_attention(
            self.q,
            self.k,
            self.v,
            self.score_mod,
            self.mask,
            enable_gqa=self.gqa,
            return_lse=True,
            kernel_options=self.options,
        )
        d_lse = self.d_lse.to(lse.dtype)
        return _grads(out, lse, self.d_out, d_lse, self.q, self.k, self.v, self.table)


def run_case(rank: int, world: int, name: str, device="cpu", dtype=torch.float64, backend=None) -> dict:
    """Ring on ``device`` in ``dtype`` against float64 gold on the CPU (and, below float64, the
    reference backend in ``dtype`` on the CPU: the three-way rule's eager leg)."""
    case = CASES[name]
    gold = _Problem(case, "cpu", torch.float64).single_device()
    eager = gold if dtype == torch.float64 else _Problem(case, "cpu", dtype, "REFERENCE").single_device()
    p = _Problem(case, device, dtype, backend)
    plan = plan_shards(p.mask, world, case.strategy)
    sharded = shard_block_mask(p.mask, plan, rank)
    local = [shard_sequence(t.detach(), plan, rank).requires_grad_() for t in (p.q, p.k, p.v)]
    stats = RingStats()
    out_r, lse_r = ring_flex_attention(
        *local,
        sharded,
        score_mod=p.score_mod,
        enable_gqa=p.gqa,
        return_lse=True,
        stats=stats,
        kernel_options=p.options,
        recompute=case.recompute,
        schedule=case.schedule,
    )
    d_out, d_lse = (shard_sequence(t, plan, rank) for t in (p.d_out, p.d_lse))
    ring = _grads(out_r, lse_r, d_out, d_lse.to(lse_r.dtype), *local, p.table)
    if p.table is not None:
        dist.all_reduce(ring["dtable"])  # each rank holds its queries' share of the table's gradient
    errors, eager_errors = {}, {}
    for key, value in ring.items():
        want, base = (
            (gold[key], eager[key])
            if key == "dtable"
            else (shard_sequence(gold[key], plan, rank), shard_sequence(eager[key], plan, rank))
        )
        errors[key] = _err(value.cpu(), want)
        eager_errors[key] = _err(base, want)
    errors["gathered out"] = _err(gather_sequence(out_r.detach(), plan).cpu(), gold["out"])
    eager_errors["gathered out"] = _err(eager["out"], gold["out"])
    return {
        "errors": errors,
        "eager_errors": eager_errors,
        "calls": sorted(stats.calls),
        "received": sorted(stats.received),
        "needed": sorted({(rank - step) % world for step, _, _ in stats.calls if step > 0}),
        "expected_calls": _expected_calls(p.mask.to("cpu"), plan, rank),
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


def run_cases(
    rank: int, world: int, names: list[str], device="cpu", dtype=torch.float64, backend=None
) -> dict:
    """``run_case`` of each name; ``device="cuda"`` puts rank r on GPU r; ``backend`` is the ring's
    kernel_options BACKEND (None: AUTO)."""
    if device == "cuda":
        device = f"cuda:{rank}"
    return {name: run_case(rank, world, name, device, dtype, backend) for name in names}
