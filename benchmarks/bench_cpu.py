"""flexattn's CPU fast path vs ``F.scaled_dot_product_attention`` on CPU, side by side in one process.

For each variant and length: flexattn (AUTO: the CPU path, ``flexattn.cpu``) and SDPA with a dense
mask built once outside the timing (bool; a float mask for ALiBi, which a bool mask cannot carry;
soft-capping's SDPA column is the causal mask alone, which SDPA can express), plus SDPA
``is_causal=True`` where the variant is plain causal. Forward (no grad) and forward+backward, timed
interleaved, medians of ``--repeats``; ratio = SDPA time / flexattn time (> 1: flexattn faster).

    python benchmarks/bench_cpu.py                  # L 2k 8k 16k, B2 H4 E64, fp32
    python benchmarks/bench_cpu.py --quick          # a short run
    python benchmarks/bench_cpu.py --dtype bf16 --sizes 2k 8k --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexattn import create_block_mask, flex_attention
from flexattn import variants as V
from flexattn.dispatch import explain_backend

VARIANTS = ("noop", "causal", "alibi", "sliding_window", "prefix_lm", "document", "softcap")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT_MASK_LIMIT = 1 << 30  # bytes: SDPA's dense float masks above this are skipped ("-")


@dataclass
class Case:
    """One variant at one length: flexattn's mods and SDPA's equivalents."""

    name: str
    score_mod: Callable | None
    mask_mod: Callable | None
    sdpa_mask: Callable[[], torch.Tensor | None] | None  # builds SDPA's dense mask (None: unmasked)
    causal: bool  # SDPA is_causal=True computes the same attention


def make_case(name: str, L: int, H: int, dtype: torch.dtype) -> Case:
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    if name == "noop":
        return Case(name, None, None, lambda: None, True)
    if name == "causal":
        return Case(name, None, V.causal(), lambda: i >= j, True)
    if name == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1) / H)[:, None, None]

        def alibi_mask():
            bias = (slopes * (j - i)).to(dtype)
            return bias.masked_fill(i < j, -float("inf"))[None]

        too_big = H * L * L * torch.finfo(dtype).bits // 8 > FLOAT_MASK_LIMIT
        return Case(name, V.alibi(H), V.causal(), None if too_big else alibi_mask, False)
    if name == "sliding_window":
        w = min(1024, L // 4)
        return Case(name, None, V.sliding_window(w), lambda: (i >= j) & (i - j <= w), False)
    if name == "prefix_lm":
        p = L // 4
        return Case(name, None, V.prefix_lm(p), lambda: (i >= j) | (j < p), False)
    if name == "document":
        cuts = torch.sort(torch.randperm(L - 1)[:11] + 1).values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([L])]))
        doc = V.document_ids_from_lengths(lengths)
        return Case(name, None, V.document_mask(doc), lambda: doc[:, None] == doc[None, :], False)
    if name == "softcap":
        return Case(name, V.tanh_softcap(30.0), V.causal(), lambda: i >= j, True)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def _timed(fn: Callable, backward: bool, dout: torch.Tensor) -> float:
    t0 = time.perf_counter()
    if backward:
        fn().backward(dout)
    else:
        with torch.no_grad():
            fn()
    return time.perf_counter() - t0


def run_case(case: Case, B: int, H: int, L: int, E: int, dtype, repeats: int, backward: bool) -> dict:
    """Median seconds per implementation and pass: {(impl, "fwd" | "fwd+bwd"): seconds}."""
    q, k, v = (torch.randn(B, H, L, E, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, L, E, dtype=dtype)
    block_mask = (
        None if case.mask_mod is None else create_block_mask(case.mask_mod, None, None, L, L, device="cpu")
    )
    impls = {"flexattn": lambda: flex_attention(q, k, v, score_mod=case.score_mod, block_mask=block_mask)}
    if case.sdpa_mask is not None:
        mask = case.sdpa_mask()
        impls["sdpa-mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if case.causal:
        impls["sdpa-causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.name != "noop")
    passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
    times = {(name, p): [] for name in impls for p in passes}
    for fn in impls.values():  # warm-up (first-call traces, allocator)
        _timed(fn, False, dout)
    for _ in range(repeats):
        for name, fn in impls.items():  # interleaved, so that noise hits every column alike
            for p in passes:
                times[(name, p)].append(_timed(fn, p == "fwd+bwd", dout))
    return {key: statistics.median(ts) for key, ts in times.items()}


def format_row(case: str, L: int, p: str, t: dict) -> str:
    flex = t.get(("flexattn", p))
    cells = [f"{case:15s}", f"{L:>6d}", f"{p:8s}", f"{flex * 1e3:10.1f}"]
    for impl in ("sdpa-mask", "sdpa-causal"):
        other = t.get((impl, p))
        cells.append(f"{other * 1e3:10.1f} {other / flex:6.2f}x" if other else f"{'-':>10s} {'':>7s}")
    return " ".join(cells)


def parse_size(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


CPU_ONLY = True  # no GPU involved (tests/test_cli.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[2048, 8192, 16384])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--quick", action="store_true", help="L 256 and 512, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [256, 512], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    B, H, E = args.batch, args.heads, args.head_dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B{B} H{H} E{E} {args.dtype}; "
          "ms (median of %d), ratio = SDPA time / flexattn time" % args.repeats)  # fmt: skip
    print(f"{'variant':15s} {'L':>6s} {'pass':8s} {'flexattn':>10s} {'sdpa-mask':>17s} {'sdpa-causal':>17s}")
    for L in args.sizes:
        for name in args.variants:
            case = make_case(name, L, H, dtype)
            t = run_case(case, B, H, L, E, dtype, args.repeats, not args.no_backward)
            for p in ("fwd",) if args.no_backward else ("fwd", "fwd+bwd"):
                print(format_row(name, L, p, t), flush=True)
    q = torch.randn(B, H, args.sizes[0], E, dtype=dtype)
    print("\n" + explain_backend(q, q, q, V.tanh_softcap(30.0)).replace("\n", "; "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
