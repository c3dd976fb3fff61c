"""Paged KV cache benchmark: flexattn paged vs contiguous, next to torch's flex_attention with and
without its PagedAttention, side by side in one process on the GPU.

Shapes: B8 Hq32 Hkv8 E128 bf16, caches of KV = 8k and 32k keys per sequence (every sequence full).
Calls: the last ``Lq`` query rows of each sequence attend causally to its cache (the mods see
logical positions ``q_idx + KV - Lq``): ``prefill`` is a chunk of Lq = 1024 rows (chunked
prefill), ``decode`` Lq = 4 (a decode step, speculative-decoding sized). Page sizes 16, 64, 256;
pages are handed out in a shuffled order (sequences grow in turns), as in a server.

Rows, per (KV, call):
- ``flexattn contiguous``: flex_attention on (B, Hkv, KV, E) caches (the block mask's KV block is the
  largest page size, at least 128, for every flexattn row);
- ``flexattn paged P``: the same call on the paged caches (the kernel reads K/V through the page
  table), with the output checked against the contiguous one (``max_diff``). Both run the kernel
  flexattn chooses: the split-KV decode kernel for ``decode``, the prefill kernel for ``prefill``
  (``--dry-run`` prints the choice);
- ``flexattn paged P (prefill kernel)`` (``decode`` only): the prefill kernel over the same pages,
  the other kernel the choice could make;
- ``torch contiguous``: ``torch.compile(torch.nn.attention.flex_attention)`` on the contiguous caches;
- ``torch paged P``: the same with torch's PagedAttention (its KV block = the page size).

Times are medians of ``triton.testing.do_bench_cudagraph`` (GPU time of a CUDA graph's replay, no
host overhead: a decode step's kernels are shorter than its host path), or of eager
``triton.testing.do_bench`` calls where a call cannot be captured (``timed`` says which); ``TB/s``
is K+V bytes read once / time (the decode metric), ``TFLOP/s`` counts 4 * B * Hq * Lq * KV * E *
density (density = fraction of the (Lq, KV) pairs the causal mask allows). ``vs contiguous``
compares each paged row with the contiguous row of its library.

Usage (CUDA machine; about two minutes on an H200)::

    python benchmarks/bench_paged.py --json paged.json
    python benchmarks/bench_paged.py --kv 8k --calls decode --pages 16 64
    python benchmarks/bench_paged.py --dry-run          # the plan, and the setup checked on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import bench  # noqa: E402  (CUDA graph replay, eager where capture fails)

from flexattn import create_block_mask, flex_attention
from flexattn.kernels.forward import flex_forward
from flexattn.options import KernelOptions
from flexattn.paged import PagedAttention
from flexattn.plan import plan_attention

CALLS = {"prefill": 1024, "decode": 4}
DECODE_ROWS = 16  # calls with at most this many query rows also time the prefill kernel over the pages
BLOCK = 128


@dataclass(frozen=True)
class Config:
    B: int = 8
    Hq: int = 32
    Hkv: int = 8
    E: int = 128
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Row:
    kv: int
    call: str
    lq: int
    impl: str
    page: int | None
    us: float | None = None
    tb_s: float | None = None
    tflop_s: float | None = None
    vs_contiguous: float | None = None
    max_diff: float | None = None
    timed: str | None = None  # "graph" (CUDA graph replay) or "eager"
    error: str | None = None


def causal_at(offset: int) -> Callable:
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def fill_paged(paged, B: int, kv: int, k, v, k_cache, v_cache, generator) -> None:
    """Reserve the B sequences in random turns (shuffled pages), then write k, v (B, Hkv, kv, E)."""
    grown, step = [0] * B, max(1, kv // 8)
    while min(grown) < kv:
        b = int(torch.randint(B, (), generator=generator, device="cpu"))  # a host decision
        if grown[b] < kv:
            grown[b] = min(kv, grown[b] + step)
            # on the caches' device: torch's PagedAttention mixes these with its CUDA tables
            paged.reserve(torch.tensor([b], device=k.device), torch.tensor([grown[b]], device=k.device))
    batch = torch.arange(B, device=k.device)
    positions = torch.arange(kv, device=k.device)[None].expand(B, kv)
    paged.assign(batch, positions, k, v, k_cache, v_cache)


def make_inputs(cfg: Config, kv: int, lq: int, device):
    q = torch.randn(cfg.B, cfg.Hq, lq, cfg.E, device=device, dtype=cfg.dtype)
    k = torch.randn(cfg.B, cfg.Hkv, kv, cfg.E, device=device, dtype=cfg.dtype)
    v = torch.randn(cfg.B, cfg.Hkv, kv, cfg.E, device=device, dtype=cfg.dtype)
    return q, k, v


def flexattn_calls(cfg: Config, kv: int, lq: int, pages, q, k, v, device, options=None) -> dict:
    """name -> (page, zero-argument call) for flexattn, contiguous and paged: one block mask for all
    (its KV block the largest page, at least 128), so the rows differ in where K/V live only."""
    mod = causal_at(kv - lq)
    blocks = (BLOCK, max(BLOCK, *pages))
    logical = create_block_mask(mod, None, None, lq, kv, device=device, BLOCK_SIZE=blocks)
    calls = {
        "flexattn contiguous": (
            None,
            lambda: flex_attention(q, k, v, block_mask=logical, enable_gqa=True, kernel_options=options),
        )
    }
    generator = torch.Generator().manual_seed(0)
    for page in pages:
        paged = PagedAttention(cfg.B * kv // page, page, cfg.B, device=device, max_pages_per_seq=kv // page)
        k_cache = torch.zeros(1, cfg.Hkv, cfg.B * kv, cfg.E, device=device, dtype=cfg.dtype)
        v_cache = torch.zeros_like(k_cache)
        fill_paged(paged, cfg.B, kv, k, v, k_cache, v_cache, generator)
        mask = paged.convert_logical_block_mask(logical, torch.arange(cfg.B, device=device))
        calls[f"flexattn paged {page}"] = (
            page,
            lambda kc=k_cache, vc=v_cache, m=mask: flex_attention(
                q, kc, vc, block_mask=m, enable_gqa=True, kernel_options=options
            ),
        )
        if lq <= DECODE_ROWS and options is None:  # (the GPU run; the dry run checks the setup only)
            plan = _plan(mask, lq, kv, q)
            calls[f"flexattn paged {page} (prefill kernel)"] = (
                page,
                lambda kc=k_cache, vc=v_cache, p=plan: flex_forward(
                    q, kc, vc, score_mod=p.score_mod, mask_mod=p.mask_mod, tables=p.tables, scale=p.scale,
                    options=p.options, paged=p.kv_pages,
                )[0],
            )  # fmt: skip
    return calls


def _plan(mask, lq: int, kv: int, q):
    """flexattn's plan of a call with ``mask`` (paged or not): its mods, tables and kernel choice."""
    pages = getattr(mask, "kv_pages", None)
    options = KernelOptions(BACKEND="TRITON")
    return plan_attention(None, mask, lq, kv, q.shape[-1] ** -0.5, options, q.device, q.dtype, kv_pages=pages)


def kernel_choices(cfg: Config, kv: int, lq: int, pages, device="cpu") -> dict[str, str]:
    """flexattn row -> the kernel flexattn's plan chooses for it (on an H200-sized target)."""
    from flexattn.kernels.device import DeviceLimits

    h200 = DeviceLimits((9, 0), 232448, 132)
    q = torch.empty(1, dtype=cfg.dtype, device=device).expand(cfg.B, cfg.Hq, lq, cfg.E)
    k = torch.empty(1, dtype=cfg.dtype, device=device).expand(cfg.B, cfg.Hkv, kv, cfg.E)
    blocks = (BLOCK, max(BLOCK, *pages))
    logical = create_block_mask(causal_at(kv - lq), None, None, lq, kv, device=device, BLOCK_SIZE=blocks)
    choices = {"flexattn contiguous": str(_plan(logical, lq, kv, q).choose(q, k, k, target=h200))}
    for page in pages:
        paged = PagedAttention(cfg.B * kv // page, page, cfg.B, device=device, max_pages_per_seq=kv // page)
        for b in range(cfg.B):
            paged.reserve(b, kv)
        mask = paged.convert_logical_block_mask(logical, torch.arange(cfg.B, device=device))
        cache = torch.empty(1, dtype=cfg.dtype, device=device).expand(1, cfg.Hkv, cfg.B * kv, cfg.E)
        choices[f"flexattn paged {page}"] = str(_plan(mask, lq, kv, q).choose(q, cache, cache, target=h200))
    return choices


def torch_calls(cfg: Config, kv: int, lq: int, pages, q, k, v, device, compiled) -> dict:
    """name -> (page, call) for torch's compiled flex_attention, contiguous and with its PagedAttention."""
    from torch.nn.attention import flex_attention as tf
    from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPaged

    mod = causal_at(kv - lq)
    logical = tf.create_block_mask(mod, None, None, lq, kv, device=device, BLOCK_SIZE=BLOCK)
    calls = {"torch contiguous": (None, lambda: compiled(q, k, v, block_mask=logical, enable_gqa=True))}
    generator = torch.Generator().manual_seed(0)
    for page in pages:
        paged = TorchPaged(cfg.B * kv // page, page, cfg.B, device=device)
        k_cache = torch.zeros(1, cfg.Hkv, cfg.B * kv, cfg.E, device=device, dtype=cfg.dtype)
        v_cache = torch.zeros_like(k_cache)
        fill_paged(paged, cfg.B, kv, k, v, k_cache, v_cache, generator)
        blocks = tf.create_block_mask(mod, cfg.B, None, lq, kv, device=device, BLOCK_SIZE=(BLOCK, page))
        mask = paged.convert_logical_block_mask(blocks, torch.arange(cfg.B, device=device))
        calls[f"torch paged {page}"] = (
            page,
            lambda kc=k_cache, vc=v_cache, m=mask: compiled(q, kc, vc, block_mask=m, enable_gqa=True),
        )
    return calls


def measure(
    cfg: Config, kv: int, call: str, pages, device, compiled, emit, options=None, torch_rows=True
) -> None:
    lq = CALLS[call]
    q, k, v = make_inputs(cfg, kv, lq, device)
    allowed = sum(min(kv, kv - lq + i + 1) for i in range(lq)) / (lq * kv)  # causal density
    flops = 4 * cfg.B * cfg.Hq * lq * kv * cfg.E * allowed
    kv_bytes = 2 * cfg.B * cfg.Hkv * kv * cfg.E * q.element_size()
    libraries = (("flexattn", flexattn_calls), ("torch", torch_calls))[: 2 if torch_rows else 1]
    for library, make in libraries:
        try:
            extra = (compiled,) if library == "torch" else (options,)
            calls = make(cfg, kv, lq, pages, q, k, v, device, *extra)
        except Exception as err:  # e.g. an old torch without PagedAttention: report, go on
            emit(Row(kv, call, lq, f"{library} (setup)", None, error=f"{type(err).__name__}: {err}"[:300]))
            continue
        reference, contiguous_us = None, None
        for name, (page, fn) in calls.items():
            row = Row(kv, call, lq, name, page)
            try:
                with torch.no_grad():
                    out = fn()
                    if page is None:
                        reference = out
                    elif reference is not None:
                        row.max_diff = (out.float() - reference.float()).abs().max().item()
                    ms, row.timed = bench(fn, rep=40)
                row.us = ms * 1e3
                row.tb_s = kv_bytes / (ms * 1e-3) / 1e12
                row.tflop_s = flops / (ms * 1e-3) / 1e12
                if page is None:
                    contiguous_us = row.us
                elif contiguous_us:
                    row.vs_contiguous = row.us / contiguous_us
            except Exception as err:
                row.error = f"{type(err).__name__}: {err}"[:300]
            emit(row)


def table(rows: list[Row]) -> str:
    lines = [
        "| KV | call | impl | us | TB/s | TFLOP/s | paged / contiguous | max diff | timed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in rows:
        if r.error:
            lines.append(f"| {r.kv // 1024}k | {r.call} | {r.impl} | error: {r.error} | | | | | |")
            continue
        lines.append(
            f"| {r.kv // 1024}k | {r.call} (Lq={r.lq}) | {r.impl} | {fmt(r.us, '.1f')} "
            f"| {fmt(r.tb_s, '.2f')} | {fmt(r.tflop_s, '.0f')} | {fmt(r.vs_contiguous, '.3f')} "
            f"| {fmt(r.max_diff, '.2e')} | {r.timed or '-'} |"
        )
    return "\n".join(lines)


def dry_run(args) -> None:
    """Print the plan; build every row's call at tiny sizes on CPU (flexattn's reference backend,
    torch's eager flex_attention) and check that they agree, so the setup runs without a GPU.

    The setup runs with ``meta`` as the default device, so a tensor it makes without naming the
    caches' device fails here, as it would beside CUDA caches on the GPU ("Expected all tensors to be
    on the same device"); the calls themselves then run on CPU."""
    for kv in args.kv:
        for call in args.calls:
            names = ["flexattn contiguous", *(f"flexattn paged {p}" for p in args.pages), "torch contiguous"]
            names += [f"torch paged {p}" for p in args.pages]
            print(f"KV={kv} {call} (Lq={CALLS[call]}): " + ", ".join(names))
            for name, choice in kernel_choices(Config(), kv, CALLS[call], args.pages).items():
                print(f"  {name}: {choice}")
    cfg = Config(B=2, Hq=4, Hkv=2, E=16, dtype=torch.float32)
    for page in args.pages:
        kv, lq = 2 * max(page, BLOCK), 3
        q, k, v = make_inputs(cfg, kv, lq, "cpu")
        from torch.nn.attention.flex_attention import flex_attention as torch_flex

        with torch.device("meta"):  # a tensor made on the default device cannot meet the CPU caches
            calls = flexattn_calls(cfg, kv, lq, [page], q, k, v, "cpu", options={"BACKEND": "REFERENCE"})
            calls.update(torch_calls(cfg, kv, lq, [page], q, k, v, "cpu", torch_flex))  # eager on CPU
        outs = {name: fn() for name, (_, fn) in calls.items()}
        for name, out in outs.items():
            diff = (out - outs["flexattn contiguous"]).abs().max().item()
            print(f"setup check, page {page}, KV={kv}: {name} vs flexattn contiguous: max diff {diff:.2e}")
            if not diff < 1e-5:
                raise SystemExit(f"dry run: {name} differs from flexattn contiguous by {diff}")


def parse_size(text: str) -> int:
    text = text.lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv", nargs="+", type=parse_size, default=[8192, 32768])
    parser.add_argument("--calls", nargs="+", choices=sorted(CALLS), default=["prefill", "decode"])
    parser.add_argument("--pages", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--json", help="write the rows as JSON to this file (after every row)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, check the setup on CPU")
    parser.add_argument("--quick", action="store_true", help="KV 8k only")
    parser.add_argument("--head-dim", type=int, default=Config.E)
    parser.add_argument("--no-torch", action="store_true", help="flexattn's rows only")
    parser.add_argument(
        "--options",
        type=json.loads,
        help="flexattn's kernel_options as JSON, e.g. "
        '\'{"PREFILL_KERNEL": "GLUON"}\' (torch\'s rows are unchanged)',
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.kv = [kv for kv in args.kv if kv <= 8192] or args.kv[:1]
    if args.dry_run:
        dry_run(args)
        return []
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged.py needs a CUDA GPU (use --dry-run to check the setup on CPU)")
    torch._dynamo.config.cache_size_limit = 64  # one graph per mask / page size
    torch._dynamo.config.recompile_limit = 64
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    compiled = torch.compile(torch_flex, dynamic=False)
    rows: list[Row] = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    def emit(row: Row) -> None:
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(r) for r in rows], f, indent=1)

    for kv in args.kv:
        for call in args.calls:
            cfg = Config(E=args.head_dim)
            measure(
                cfg,
                kv,
                call,
                args.pages,
                torch.device("cuda"),
                compiled,
                emit,
                args.options,
                not args.no_torch,
            )
            torch.cuda.empty_cache()
    print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
