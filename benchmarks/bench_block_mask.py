"""create_block_mask benchmark: flexattn's generated kernel vs torch's create_block_mask, eager and
``_compile=True``, side by side in one process.

Masks (self-attention, S = Q_LEN = KV_LEN, BLOCK_SIZE 128): causal, sliding window 1024 (causal),
prefix LM (S/4), and packed documents with random lengths (about one per 4096 tokens: 256 at 1M),
per batch element when B > 1. Builders:

- ``flexattn``: ``flexattn.create_block_mask`` (the kv-side lists; the q side is built on first use);
- ``flexattn+q``: the same, then the q side (``mask.tables()``): the four tables torch builds;
- ``torch-eager``, ``torch-compiled``: torch's ``create_block_mask`` with ``_compile`` False / True.

For each (mask, S, B) and builder it reports:

- ``time``: the median of the calls after the first (``--reps``, stopping after ``--rep-seconds``),
  CUDA events around each call, in ms;
- ``peak``: peak GPU memory allocated during one call beyond what was allocated before, in MiB, and
  ``held``: what the returned mask keeps (its tables);
- ``first``: the first call at this (mask, S, B), in ms. At the first size of each mask the caches
  start empty (flexattn: ``clear_cache()``, trace + code generation, and Triton's compile in a fresh
  cache directory unless ``--keep-triton-cache``; torch: ``torch._dynamo.reset()``); later sizes show
  what a new length costs in a warm process (torch recompiles, flexattn does not).

A row that cannot run (torch eager builds an S x S mask: out of memory from 128k on) says so in its
cell instead of stopping the run. On ``--device cpu`` (tiny sizes; what the tests run) times come from
the wall clock and memory is not measured.

Usage::

    python benchmarks/bench_block_mask.py                       # S = 8k 32k 128k 1M, B = 1 and 8
    python benchmarks/bench_block_mask.py --sizes 8k 32k --batch 1 --masks causal document
    python benchmarks/bench_block_mask.py --json results.json   # also write the rows as JSON
    python benchmarks/bench_block_mask.py --dry-run             # print the plan only
    python benchmarks/bench_block_mask.py --device cpu --sizes 512 --builders flexattn torch-eager
"""

from __future__ import annotations

import argparse
import gc
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
BUILDERS = ("flexattn", "flexattn+q", "torch-eager", "torch-compiled")


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
    calls: int = 0
    peak_mib: float | None = None
    held_mib: float | None = None
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


def _builder(name: str, device: torch.device) -> Callable:
    """``build(mod, B, S) -> mask`` of one builder."""
    if name in ("flexattn", "flexattn+q"):
        with_q = name == "flexattn+q"
        backend = "triton" if device.type == "cuda" else "auto"  # the generated kernel, never a fallback

        def build(mod, B, S):
            mask = flexattn.create_block_mask(mod, B, None, S, S, device=device, backend=backend)
            if with_q:
                mask.tables()  # derive and keep the transposed view
            return mask

        return build
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    compiled = name == "torch-compiled"
    return lambda mod, B, S: torch_create_block_mask(mod, B, None, S, S, device=device, _compile=compiled)


def reset_caches(builder: str) -> None:
    """Start a builder's first call from empty caches (its compile is then part of the first call)."""
    if builder.startswith("flexattn"):
        flexattn.compiler.clear_cache()
    else:
        torch._dynamo.reset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn: Callable, device: torch.device) -> float:
    """Milliseconds of one call (CUDA events on the GPU, the wall clock elsewhere)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _error_text(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory"
    first_line = str(e).splitlines()[0][:80] if str(e) else ""
    return f"{type(e).__name__}: {first_line}"


def measure(case: Case, builder: str, args: argparse.Namespace, fresh: bool) -> Result:
    """First call, median steady-state time and peak memory of one builder on one case."""
    result = Result(str(case), builder)
    device = torch.device(args.device)
    try:
        mod = make_mask_mod(case, device)
        build = _builder(builder, device)
        if fresh:
            reset_caches(builder)
        _sync(device)
        t0 = time.perf_counter()
        build(mod, case.B, case.S)
        _sync(device)
        result.first_ms = (time.perf_counter() - t0) * 1e3
        times, deadline = [], time.perf_counter() + args.rep_seconds
        while len(times) < args.reps and (not times or time.perf_counter() < deadline):
            times.append(_timed_call(lambda: build(mod, case.B, case.S), device))
        result.time_ms, result.calls = statistics.median(times), len(times)
        if device.type == "cuda":
            result.peak_mib, result.held_mib = _peak_and_held(lambda: build(mod, case.B, case.S))
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure (OOM, unsupported)
        result.error = _error_text(e)
    gc.collect()  # the failed call's tensors die with its traceback
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _peak_and_held(call: Callable) -> tuple[float, float]:
    """(peak MiB allocated during ``call`` beyond what was allocated before, MiB its result holds)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mask = call()
    torch.cuda.synchronize()
    peak, held = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    del mask
    return peak / 2**20, held / 2**20


def plan(args: argparse.Namespace) -> list[tuple[Case, str, bool]]:
    """(case, builder, fresh caches) triples to run, in order."""
    runs = []
    for mask in args.masks:
        for i, S in enumerate(args.sizes):
            for j, B in enumerate(args.batch):
                for builder in args.builders:
                    runs.append((Case(mask, S, B), builder, i == j == 0))
    return runs


def _cell(r: Result | None, field: str, fmt: str) -> str:
    if r is None:
        return "–"
    if r.error:
        return r.error
    value = getattr(r, field)
    return "n/a" if value is None else format(value, fmt)


def table(results: list[Result], builders: list[str]) -> str:
    """One row per case, the builders side by side: time, peak memory, first call."""
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.builder] = r
    names = list(builders)
    header = ["case"] + [f"{b} (ms)" for b in names]
    compare = "flexattn" in names and "torch-compiled" in names
    header += ["flexattn vs torch compiled"] if compare else []
    header += [f"{b} peak / held (MiB)" for b in names] + [f"{b} first call (ms)" for b in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, row in by_case.items():
        cells = [case] + [_cell(row.get(b), "time_ms", ".3f") for b in names]
        if compare:
            ours, theirs = row.get("flexattn"), row.get("torch-compiled")
            ok = ours and theirs and not ours.error and not theirs.error
            cells.append(f"{theirs.time_ms / ours.time_ms:.1f}x" if ok else "–")
        for b in names:
            r = row.get(b)
            both = r is not None and not r.error and r.peak_mib is not None
            cells.append(f"{r.peak_mib:.1f} / {r.held_mib:.1f}" if both else _cell(r, "peak_mib", ".1f"))
        cells += [_cell(row.get(b), "first_ms", ".1f") for b in names]
        lines.append("| " + " | ".join(cells) + " |")
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
    parser.add_argument("--rep-seconds", type=float, default=3.0,
                        help="stop timing a row after this long (at least one call)")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (tiny sizes, tests)")
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
        for case, builder, fresh in runs:
            print(f"{case}  {builder}" + ("  (empty caches)" if fresh else ""))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_block_mask.py needs a CUDA GPU (--device cpu for tiny sizes, --dry-run).")
    if not args.keep_triton_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-block-mask-triton-")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, flexattn {flexattn.__file__}")
    results = []
    for case, builder, fresh in runs:
        results.append(measure(case, builder, args, fresh))
        r = results[-1]
        line = r.error or f"first {r.first_ms:9.1f} ms  time {r.time_ms:9.3f} ms ({r.calls} calls)"
        if not r.error and r.peak_mib is not None:
            line += f"  peak {r.peak_mib:8.1f} MiB  held {r.held_mib:8.1f} MiB"
        print(f"{r.case:32s} {r.builder:15s} {line}", flush=True)
        if args.json:  # after every row, so a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
    print()
    print(table(results, args.builders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
