"""create_block_mask benchmark: flexattn's generated kernel vs torch's create_block_mask (eager and
``_compile=True``), side by side in one process on the GPU.

Masks (self-attention, S = Q_LEN = KV_LEN, BLOCK_SIZE 128): causal, sliding window 1024 (causal),
prefix LM (S/4), and packed documents with random lengths (about one per 4096 tokens: a few hundred
at 1M), per batch element when B > 1. For each (mask, S, B) it reports:

- ``first``: the first call with a new mask_mod, in ms. flexattn: after ``clear_cache()`` (trace and
  code generation); the Triton compile of the kernels happens in the first row of each mask only
  (Triton's cache starts empty in a fresh directory, unless ``--keep-triton-cache``), later rows of
  the same mask show that new lengths and batch sizes do not recompile. torch compiled: after
  ``torch._dynamo.reset()``, so its compile, every row;
- ``time``: the median of ``--reps`` further calls (CUDA events around each call), in ms;
- ``peak``: peak GPU memory allocated during one call beyond what was allocated before, in MiB
  (the BlockMask's own tables are part of it: (B, 1, S/128, S/128) int32 lists, four of them).

torch eager materialises an S x S mask (O(S^2) memory): it is skipped above ``--eager-max``.
Errors (e.g. out of memory) are reported in the table instead of stopping the run.

Usage (CUDA machine)::

    python benchmarks/bench_block_mask.py                       # S = 8k 32k 128k 1M, B = 1 and 8
    python benchmarks/bench_block_mask.py --sizes 8k 32k --batch 1 --masks causal document
    python benchmarks/bench_block_mask.py --json results.json   # also write the rows as JSON
    python benchmarks/bench_block_mask.py --dry-run             # print the plan only (works on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import flexattn
from flexattn import variants as V

MASKS = ("causal", "sliding_window", "prefix_lm", "document")
BUILDERS = ("flexattn", "torch-eager", "torch-compiled")


@dataclass(frozen=True)
class Case:
    mask: str
    S: int
    B: int

    def __str__(self) -> str:
        return f"{self.mask} S={_fmt_size(self.S)} B={self.B}"


@dataclass
class Result:
    case: str
    builder: str
    first_ms: float | None = None
    time_ms: float | None = None
    peak_mib: float | None = None
    error: str | None = None


def _parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text[:-1] if text[-1] in "km" else text) * scale)


def _fmt_size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _random_doc_ids(B: int, S: int, device) -> torch.Tensor:
    """(B, S) int32 document ids: about one document per 4096 tokens, random lengths, per row."""
    docs = max(2, S // 4096)
    rows = []
    for _ in range(B):
        cuts = torch.randperm(S - 1)[: docs - 1].sort().values + 1
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([S])])
        rows.append(V.document_ids_from_lengths(bounds.diff()))
    return torch.stack(rows).to(device)


def make_mask_mod(case: Case, device) -> Callable:
    """The case's mask_mod (plain torch code: the same function serves every builder)."""
    if case.mask == "causal":
        return V.causal()
    if case.mask == "sliding_window":
        return V.sliding_window(1024)
    if case.mask == "prefix_lm":
        return V.prefix_lm(case.S // 4)
    if case.mask == "document":
        ids = _random_doc_ids(case.B, case.S, device)
        return V.document_mask(ids[0] if case.B == 1 else ids)
    raise ValueError(f"unknown mask {case.mask!r}; choose from {MASKS}")


def _builder(name: str) -> Callable:
    if name == "flexattn":
        return lambda mod, B, S: flexattn.create_block_mask(
            mod, B, None, S, S, device="cuda", backend="triton"
        )
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    compiled = name == "torch-compiled"
    return lambda mod, B, S: torch_create_block_mask(mod, B, None, S, S, device="cuda", _compile=compiled)


def _timed_call(fn: Callable) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def measure(case: Case, builder: str, reps: int) -> Result:
    """First call, median steady-state time and peak memory of one builder on one case."""
    result = Result(str(case), builder)
    device = torch.device("cuda")
    try:
        mod = make_mask_mod(case, device)
        build = _builder(builder)
        B = case.B
        if builder == "flexattn":
            flexattn.compiler.clear_cache()
        else:
            torch._dynamo.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        build(mod, B, case.S)
        torch.cuda.synchronize()
        result.first_ms = (time.perf_counter() - t0) * 1e3
        times = [_timed_call(lambda: build(mod, B, case.S)) for _ in range(reps)]
        result.time_ms = statistics.median(times)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        mask = build(mod, B, case.S)
        torch.cuda.synchronize()
        result.peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        del mask
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure (OOM, unsupported)
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        torch.cuda.empty_cache()
    return result


def plan(args: argparse.Namespace) -> list[tuple[Case, str]]:
    """(case, builder) pairs to run, in order."""
    runs = []
    for mask in args.masks:
        for S in args.sizes:
            for B in args.batch:
                case = Case(mask, S, B)
                for builder in args.builders:
                    if builder == "torch-eager" and args.eager_max < S:
                        continue
                    runs.append((case, builder))
    return runs


def table(results: list[Result]) -> str:
    lines = ["| case | builder | first call (ms) | time (ms) | peak (MiB) |", "|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.case} | {r.builder} | {r.error} | | |")
        else:
            lines.append(
                f"| {r.case} | {r.builder} | {r.first_ms:.1f} | {r.time_ms:.3f} | {r.peak_mib:.1f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", type=_parse_size, default=[_parse_size(s) for s in ("8k", "32k", "128k", "1M")]
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--builders", nargs="+", choices=BUILDERS, default=list(BUILDERS))
    parser.add_argument("--reps", type=int, default=10, help="timed calls after the first (median)")
    parser.add_argument("--eager-max", type=_parse_size, default=_parse_size("32k"),
                        help="skip torch eager above this S (it builds an S x S mask)")  # fmt: skip
    parser.add_argument("--json", help="also write the results to this JSON file (after every row)")
    parser.add_argument(
        "--keep-triton-cache",
        action="store_true",
        help="reuse Triton's on-disk cache (first calls skip compiles)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="8k and 32k, B=1 only, 3 timed calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.reps = [s for s in args.sizes if s <= _parse_size("32k")], [1], 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    if args.dry_run:
        for case, builder in runs:
            print(f"{case}  {builder}")
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_block_mask.py needs a CUDA GPU (use --dry-run to see the plan).")
    if not args.keep_triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-block-mask-triton-")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, flexattn {flexattn.__file__}")
    results = []
    for case, builder in runs:
        results.append(measure(case, builder, args.reps))
        r = results[-1]
        print(
            f"{r.case:32s} {r.builder:15s} "
            + (
                r.error or f"first {r.first_ms:9.1f} ms  time {r.time_ms:9.3f} ms  peak {r.peak_mib:8.1f} MiB"
            ),
            flush=True,
        )
        if args.json:  # after every row, so a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
