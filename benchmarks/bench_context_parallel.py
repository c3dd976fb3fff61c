"""Context-parallel attention benchmark: ring_flex_attention on 2-8 GPUs vs the single-GPU kernel.

For causal and document-causal masks (packed documents of random lengths) at 32k-1M tokens, bf16,
forward + backward, it reports per configuration:

- ``ring ms``: time per step of ``ring_flex_attention`` (the slowest rank; CUDA events, median);
- ``TFLOP/s/GPU``: 3.5 * 4 * B * H * L^2 * E * density / world / time (density = visited blocks);
- ``single TFLOP/s``: ``flex_attention`` of the whole sequence on one GPU (``--single-max-tokens``
  and below; longer sequences are measured at L / world tokens, marked ``@L/N``);
- ``efficiency``: TFLOP/s/GPU / single TFLOP/s (1.0 = perfect scaling);
- ``peak GB``: the largest ``torch.cuda.max_memory_allocated`` over the ranks;
- the plan's imbalance (max / mean visited blocks per rank) and ring busy fraction (``ShardPlan.ring_busy``).

``--schedule direct`` sends each K/V shard only to the ranks that need it; ``--recompute`` keeps only
q, k, v for the backward (needed for the longest sequences).

Usage (one node)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/bench_context_parallel.py
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --tokens 32768 --masks causal
    python benchmarks/bench_context_parallel.py --dry-run --world-size 8   # plans only, any machine

``NCCL_NVLS_ENABLE=0`` is set by the script too (NVLink SHARP multicast stays off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from train_gpt_packed import document_causal_block_mask  # noqa: E402

from flexattn import flex_attention  # noqa: E402
from flexattn.distributed import plan_shards, ring_flex_attention, shard_block_mask, shard_sequence  # noqa: E402
from flexattn.variants import causal, document_ids_from_lengths  # noqa: E402

BLOCK = 128


@dataclass
class Row:
    mask: str
    tokens: int
    world: int
    strategy: str
    schedule: str
    imbalance: float
    ring_busy: float
    ring_ms: float | None = None
    tflops_per_gpu: float | None = None
    single_tflops: float | None = None
    single_at: str | None = None
    efficiency: float | None = None
    peak_gb: float | None = None


def document_ids(tokens: int, mean_doc: int, seed: int, device) -> torch.Tensor:
    """(1, tokens) int32 ids of packed documents, lengths uniform in [mean_doc / 4, 7 * mean_doc / 4]."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = int(torch.randint(mean_doc // 4, 7 * mean_doc // 4 + 1, (), generator=g))
        lengths.append(min(n, tokens - total))
        total += lengths[-1]
    return document_ids_from_lengths(torch.tensor(lengths)).to(device)[None]


def make_mask(kind: str, tokens: int, device, mean_doc: int):
    """The global BlockMask, built from block boundaries (O(blocks^2), fine at 1M tokens)."""
    if kind == "causal":
        ids = torch.zeros(1, tokens, dtype=torch.int32, device=device)
        mask = document_causal_block_mask(ids, BLOCK)
        mask.mask_mod = causal()
        return mask
    return document_causal_block_mask(document_ids(tokens, mean_doc, 0, device), BLOCK)


def density(mask) -> float:
    return float(mask.to_dense().float().mean())


def flops(args, tokens: int, dens: float) -> float:
    return 3.5 * 4 * args.batch * args.heads * tokens * tokens * args.head_dim * dens


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median ms of ``fn`` on this rank, the slowest rank's per iteration when distributed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        t = torch.tensor(start.elapsed_time(stop), device="cuda")
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def fwd_bwd(attend, q, k, v, d_out):
    def step():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(d_out)

    return step


def qkv(args, tokens: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (args.batch, args.heads, tokens, args.head_dim)
    return [torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)]


def single_gpu_tflops(args, kind: str, tokens: int) -> float:
    mask = make_mask(kind, tokens, "cuda", args.mean_doc)
    q, k, v, d_out = qkv(args, tokens, 1)
    for t in (q, k, v):
        t.requires_grad_()
    ms = time_ms(
        fwd_bwd(lambda a, b, c: flex_attention(a, b, c, block_mask=mask), q, k, v, d_out), args.iters
    )
    return flops(args, tokens, density(mask)) / (ms * 1e-3) / 1e12


def measure(args, kind: str, tokens: int, rank: int, world: int, single_cache: dict) -> Row:
    mask = make_mask(kind, tokens, "cuda", args.mean_doc)
    plan = plan_shards(mask, world, args.strategy)
    sharded = shard_block_mask(mask, plan, rank)
    full = qkv(args, tokens, 0)
    q, k, v, d_out = (shard_sequence(t, plan, rank, dim=2) for t in full)
    del full
    for t in (q, k, v):
        t.requires_grad_()
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(
        fwd_bwd(
            lambda a, b, c: ring_flex_attention(
                a, b, c, sharded, schedule=args.schedule, recompute=args.recompute
            ),
            q,
            k,
            v,
            d_out,
        ),
        args.iters,
    )
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    row = Row(
        kind,
        tokens,
        world,
        args.strategy,
        args.schedule,
        plan.imbalance,
        plan.ring_busy,
        ms,
        peak_gb=float(peak),
    )
    row.tflops_per_gpu = flops(args, tokens, density(mask)) / world / (ms * 1e-3) / 1e12
    single_tokens = tokens if tokens <= args.single_max_tokens else tokens // world
    key = (kind, single_tokens)
    if key not in single_cache:  # every rank measures (identical work), rank 0's number is reported
        single_cache[key] = single_gpu_tflops(args, kind, single_tokens)
    row.single_tflops = single_cache[key]
    row.single_at = "L" if single_tokens == tokens else "L/N"
    row.efficiency = row.tflops_per_gpu / row.single_tflops
    return row


def dry_run(args) -> None:
    for kind in args.masks:
        for tokens in args.tokens:
            mask = make_mask(kind, tokens, "cpu", args.mean_doc)
            plan = plan_shards(mask, args.world_size, args.strategy)
            print(
                f"{kind} {tokens} tokens, density {density(mask):.3f}, "
                f"{flops(args, tokens, density(mask)) / 1e12:.1f} TFLOP per fwd+bwd"
            )
            print(plan.describe())
            calls = [shard_block_mask(mask, plan, r).calls for r in range(args.world_size)]
            print(f"  attention calls per rank: {calls}")


def format_row(r: Row) -> str:
    return (
        f"{r.mask:>8} {r.tokens:>8} x{r.world} {r.strategy:>9} {r.schedule:>6} imb {r.imbalance:.3f} "
        f"busy {r.ring_busy:.2f} | "
        f"ring {r.ring_ms:8.2f} ms "
        f"{r.tflops_per_gpu:6.1f} TFLOP/s/GPU | single {r.single_tflops:6.1f} @{r.single_at:<3} | "
        f"eff {r.efficiency:.2f} | peak {r.peak_gb:.1f} GB"
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", default="causal,document", type=lambda s: s.split(","))
    parser.add_argument(
        "--tokens",
        default="32768,131072,262144,1048576",
        type=lambda s: [int(x) for x in s.split(",")],
        help="global sequence lengths",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mean-doc", type=int, default=8192, help="mean document length (document mask)")
    parser.add_argument("--strategy", default="zigzag", choices=["zigzag", "balanced", "contiguous"])
    parser.add_argument("--schedule", default="ring", choices=["ring", "direct"])
    parser.add_argument("--recompute", action="store_true", help="ring_flex_attention(recompute=True)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--single-max-tokens", type=int, default=131072)
    parser.add_argument("--json", type=Path, help="write the rows here (rank 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the plans; no GPU or process group")
    parser.add_argument("--world-size", type=int, default=8, help="ranks for --dry-run")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_context_parallel needs CUDA GPUs (launch with torchrun); try --dry-run")
    dist.init_process_group("nccl")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        rows, single_cache = [], {}
        for kind in args.masks:
            for tokens in args.tokens:
                row = measure(args, kind, tokens, rank, world, single_cache)
                rows.append(row)
                if rank == 0:
                    print(format_row(row), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
