"""Decode benchmark: flexattn's split-KV decode kernel vs its prefill kernel, torch's compiled
flex_attention and SDPA (flash, cuDNN), side by side in one process.

B8 Hq32 Hkv8 E128 bf16, KV cache 8k / 32k / 128k, Lq = 1 / 4 / 8 / 16 query tokens at the end of the
cache, two variants:

- ``noop``: every key (SDPA: plain attention with ``enable_gqa``);
- ``causal+alibi``: causal over the cache (query token i at position L - Lq + i) plus an ALiBi bias.
  flexattn decode: a BlockMask for the whole sequence (L, L) read at the absolute positions
  (``Positions(q_offset=L - Lq)``); flexattn prefill and torch flex: a mask for (Lq, L) with the offset
  inside the mask_mod. SDPA cannot express it (n/a).

and a ragged batch (8 caches of 1k..128k keys padded to 128k, ``Positions(kv_lengths=...)``), where the
bandwidth counts only the keys that exist.

Effective bandwidth = bytes of K and V read / time. Every implementation is timed replaying a CUDA
graph (``triton.testing.do_bench_cudagraph``: GPU time, no host overhead), eagerly where capture
fails (the row says ``timed: eager``). ``flexattn decode`` launches a prebuilt plan
(``AttentionPlan.forward``); ``flexattn call`` is the whole eager ``flexattn.flex_attention`` call
(checks, mod lookup, host time included). Each cell also gives the time relative to flexattn
decode (x > 1: slower than flexattn decode) and the largest difference of its output from it.

Usage (CUDA machine)::

    python benchmarks/bench_decode.py --json decode.json    # whole run, ~3 minutes on an H200
    python benchmarks/bench_decode.py --dry-run             # list the rows and flexattn's kernel choice
    python benchmarks/bench_decode.py --rows "KV 8k Lq1 " "KV 8k Lq8 " --sweep-q-lens 8   # some rows

The run ends with a sweep of the decode kernel's split count and tiles at 8k / 32k keys (``--no-sweep``
skips it): tuning data for ``flexattn/kernels/kernel_choice.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.attention.flex_attention  # (torch 2.11 does not import the submodule itself)
import torch.nn.functional as F

import flexattn
from flexattn import Positions

B, HQ, HKV, E = 8, 32, 8, 128
KV_LENGTHS = (8192, 32768, 131072)
Q_LENS = (1, 4, 8, 16)
VARIANTS = ("noop", "causal+alibi")
RAGGED = (1024, 131072, 8192, 100000, 4096, 65536, 32768, 16384)
SLOPES = [2.0 ** (-8.0 * (h + 1) / HQ) for h in range(HQ)]


@dataclass(frozen=True)
class Row:
    kv_len: int
    q_len: int
    variant: str
    ragged: bool = False

    def __str__(self) -> str:
        kind = "ragged 1k-128k" if self.ragged else f"KV {self.kv_len // 1024}k"
        return f"{kind} Lq{self.q_len} {self.variant}"


def rows() -> list[Row]:
    table = [Row(L, lq, variant) for variant in VARIANTS for L in KV_LENGTHS for lq in Q_LENS]
    return table + [Row(max(RAGGED), lq, "noop", ragged=True) for lq in (1, 4)]


def alibi(score, b, h, q_idx, kv_idx):
    return score + _slopes[h] * (kv_idx - q_idx)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_slopes = torch.tensor(SLOPES)


def offset_causal(offset: int):
    def causal_at_offset(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_at_offset


def offset_alibi(offset: int):
    def alibi_at_offset(score, b, h, q_idx, kv_idx):
        return score + _slopes[h] * (kv_idx - q_idx - offset)

    return alibi_at_offset


MERGE_KERNEL = {"DECODE_MERGE": "KERNEL"}  # kernel_options of the merge-kernel columns (fused: the default)


def bench(fn, graph: bool = True, rep: int = 30) -> tuple[float, str]:
    """Milliseconds per call of ``fn`` and how they were taken: replayed from a CUDA graph (GPU time
    only, what a serving loop with graphs pays) or, where capture fails or ``graph`` is False, eager
    calls (host time included; median of ``triton.testing.do_bench``); ``rep``: ms of repeats."""
    import triton

    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"), "graph"
        except Exception:  # noqa: BLE001 (a call that cannot be captured is timed eagerly)
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"), "eager"


def run_row(row: Row, torch_flex, device) -> dict:
    L, lq = row.kv_len, row.q_len
    q = torch.randn(B, HQ, lq, E, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, L, E, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    offset = L - lq
    result = {"row": str(row), "kv_len": L, "q_len": lq, "variant": row.variant, "ragged": row.ragged}
    if row.ragged:
        lengths = torch.tensor(RAGGED, dtype=torch.int32, device=device)
        positions = Positions(q_offset=lengths - lq, kv_lengths=lengths)
        padded = Positions(q_offset=offset)
        tokens = sum(RAGGED)
        plan = _plan(None, None, lq, L, device)
        calls = {
            "flexattn decode": lambda: plan.forward(q, k, v, positions=positions),
            "flexattn call": lambda: flexattn.flex_attention(q, k, v, enable_gqa=True, positions=positions),
            "flexattn decode (padded, all 128k)": lambda: plan.forward(q, k, v, positions=padded),
        }
    elif row.variant == "noop":
        tokens = B * L
        plan = _plan(None, None, lq, L, device)
        merge_kernel = _plan(None, None, lq, L, device, merge="KERNEL")
        calls = {
            "flexattn decode": lambda: plan.forward(q, k, v),
            "flexattn decode merge kernel": lambda: merge_kernel.forward(q, k, v),
            "flexattn call": lambda: flexattn.flex_attention(q, k, v, enable_gqa=True),
            "flexattn call merge kernel": lambda: flexattn.flex_attention(
                q, k, v, enable_gqa=True, kernel_options=MERGE_KERNEL
            ),
            "flexattn prefill": lambda: _prefill(plan, q, k, v),
            "torch flex": lambda: torch_flex(q, k, v, enable_gqa=True),
            "sdpa flash": lambda: _sdpa(q, k, v, "FLASH_ATTENTION"),
            "sdpa cudnn": lambda: _sdpa(q, k, v, "CUDNN_ATTENTION"),
        }
    else:
        tokens = B * L
        full_mask = _whole_sequence_mask(L, device)
        positions = Positions(q_offset=offset)
        plan = _plan(alibi, full_mask, lq, L, device)
        merge_kernel = _plan(alibi, full_mask, lq, L, device, merge="KERNEL")
        short_causal, short_alibi = offset_causal(offset), offset_alibi(offset)
        short_mask = flexattn.create_block_mask(short_causal, None, None, lq, L, device=device)
        short_plan = _plan(short_alibi, short_mask, lq, L, device)
        from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask

        torch_mask = torch_block_mask(short_causal, None, None, lq, L, device=device)
        calls = {
            "flexattn decode": lambda: plan.forward(q, k, v, positions=positions),
            "flexattn decode merge kernel": lambda: merge_kernel.forward(q, k, v, positions=positions),
            "flexattn call": lambda: flexattn.flex_attention(
                q, k, v, alibi, full_mask, enable_gqa=True, positions=positions
            ),
            "flexattn call merge kernel": lambda: flexattn.flex_attention(
                q, k, v, alibi, full_mask, enable_gqa=True, positions=positions, kernel_options=MERGE_KERNEL
            ),
            "flexattn prefill": lambda: _prefill(short_plan, q, k, v),
            "torch flex": lambda: torch_flex(q, k, v, short_alibi, torch_mask, enable_gqa=True),
        }
    kv_bytes = 2 * tokens * HKV * E * k.element_size()
    for name, call in calls.items():
        try:
            ms, how = bench(call, graph=not name.startswith("flexattn call"))
            result[name] = {
                "us": round(ms * 1e3, 1),
                "TB/s": round(kv_bytes / (ms * 1e-3) / 1e12, 3),
                "timed": how,
            }
        except Exception as err:  # noqa: BLE001 (a backend that cannot run this row: say why, keep going)
            result[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    _check_agreement(result, calls)
    return result


def _check_agreement(result: dict, calls: dict) -> None:
    """Max |decode - other| over the outputs (bf16): the row is only meaningful if they agree."""
    if "us" not in result.get("flexattn decode", {}):
        return
    ref = calls["flexattn decode"]()[0]
    others = (
        "flexattn decode merge kernel",
        "flexattn call",
        "flexattn call merge kernel",
        "flexattn prefill",
    )
    for name in (*others, "torch flex", "sdpa cudnn"):
        if name in calls and "us" in result.get(name, {}):
            other = calls[name]()
            other = other[0] if isinstance(other, tuple) else other
            result[name]["max_diff"] = round(float((ref.float() - other.float()).abs().max()), 4)


@functools.cache
def _whole_sequence_mask(L: int, device: str):
    """The causal BlockMask of the whole sequence (L, L), built once per length."""
    return flexattn.create_block_mask(causal, None, None, L, L, device=device)


def _plan(score_mod, block_mask, lq, L, device, merge: str = "FUSED"):
    """A flexattn plan built once (mods compiled, tables read): what a repeated call launches;
    ``merge``: kernel_options DECODE_MERGE."""
    from flexattn.options import KernelOptions
    from flexattn.plan import plan_attention

    options = KernelOptions(BACKEND="TRITON", DECODE_MERGE=merge)
    return plan_attention(score_mod, block_mask, lq, L, 1 / math.sqrt(E), options, torch.device(device),
                          torch.bfloat16)  # fmt: skip


def _prefill(plan, q, k, v):
    """The prefill kernel on a plan (what flexattn ran for decoding before the decode kernel)."""
    from flexattn.kernels.forward import flex_forward

    return flex_forward(q, k, v, score_mod=plan.score_mod, mask_mod=plan.mask_mod, tables=plan.tables,
                        scale=plan.scale, options=plan.options)  # fmt: skip


def _sdpa(q, k, v, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def print_row(result: dict) -> None:
    cells = []
    decode = result.get("flexattn decode", {})
    for name, value in result.items():
        if not isinstance(value, dict):
            continue
        if "error" in value:
            cells.append(f"{name}: {value['error']}")
            continue
        text = f"{name} {value['us']} us {value['TB/s']} TB/s"
        if name != "flexattn decode" and "us" in decode:
            text += f" (decode x{value['us'] / decode['us']:.2f})"
        if "max_diff" in value:
            text += f" diff {value['max_diff']}"
        cells.append(text)
    print(f"{result['row']:<28} | " + " | ".join(cells), flush=True)


def dry_run() -> None:
    """The rows and flexattn's kernel choice for each (shape-only CPU tensors, nothing launched)."""
    from flexattn.kernels.device import DeviceLimits
    from flexattn.options import KernelOptions
    from flexattn.plan import plan_attention

    h200 = DeviceLimits((9, 0), 232448, 132)
    for row in rows():
        q = torch.empty(1, dtype=torch.bfloat16).expand(B, HQ, row.q_len, E)
        k = torch.empty(1, dtype=torch.bfloat16).expand(B, HKV, row.kv_len, E)
        mask = None
        if row.variant != "noop":  # the choice reads the block sizes only: one q block of the mask is enough
            mask = flexattn.create_block_mask(causal, None, None, 128, row.kv_len, device="cpu")
        score_mod = alibi if mask is not None else None
        options = KernelOptions(BACKEND="TRITON")
        plan = plan_attention(score_mod, mask, row.q_len, row.kv_len, 1 / math.sqrt(E), options,
                              torch.device("cpu"), torch.bfloat16)  # fmt: skip
        positions = None
        if row.ragged:
            lengths = torch.tensor(RAGGED, dtype=torch.int32)
            positions = Positions(q_offset=lengths - row.q_len, kv_lengths=lengths)
        elif mask is not None:
            positions = Positions(q_offset=row.kv_len - row.q_len)
        print(f"{str(row):<28} | {plan.choose(q, k, k, positions=positions, target=h200)}")


SWEEP_SPLITS = (2, 4, 6, 8, 12, 16, 24, 32)
SWEEP_TILES = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3))
# (BLOCK_N, warps, stages); 64-key tiles at 3-4 stages fit two programs per SM (128-key ones one)


def sweep(device, q_lens=(1, 16), variants=("noop",), lengths=(8192, 32768)) -> list[dict]:
    """The decode kernel alone (CUDA graphs) at other split counts and tiles than it picks: data for
    tuning ``kernel_choice`` (printed and saved, changes nothing). ``causal+alibi`` runs the
    block-sparse walk over the whole-sequence mask at the cache's end, as the table's rows do; each
    tile configuration runs at the split count the kernel picks and at twice it."""
    results = []
    for L in lengths:
        for lq in q_lens:
            q = torch.randn(B, HQ, lq, E, device=device, dtype=torch.bfloat16)
            k, v = (torch.randn(B, HKV, L, E, device=device, dtype=torch.bfloat16) for _ in range(2))
            for variant in variants:
                if variant == "noop":
                    plan, positions = _plan(None, None, lq, L, device), None
                else:
                    plan, positions = (
                        _plan(alibi, _whole_sequence_mask(L, device), lq, L, device),
                        Positions(q_offset=L - lq),
                    )
                cells = _sweep_cells(q, k, v, plan, positions)
                name = f"sweep KV {L // 1024}k Lq{lq} {variant}"
                results.append({"row": f"{name} (TB/s)", **cells})
                text = " | ".join(f"{cell} {value}" for cell, value in cells.items())
                print(f"{name} TB/s | {text}", flush=True)
    return results


def _sweep_cells(q, k, v, plan, positions) -> dict:
    from flexattn.kernels.decode import flex_decode
    from flexattn.kernels.device import device_limits
    from flexattn.kernels.kernel_choice import DecodeTiles, decode_launch

    lq, L = q.shape[2], k.shape[2]
    tables = None if plan.dense else plan.tables
    blocks = {"q_block": None, "kv_block": None} if tables is None else {
        "q_block": tables.q_block, "kv_block": tables.kv_block}  # fmt: skip
    auto = decode_launch(batch=B, q_heads=HQ, kv_heads=HKV, q_len=lq, kv_len=L, head_dim=E, v_head_dim=E,
                         dtype=q.dtype, per_head_mask=False, target=device_limits(q.device),
                         **blocks)  # fmt: skip
    tiles = [auto.tiles] + [DecodeTiles(auto.tiles.BLOCK_M, n, w, st) for n, w, st in SWEEP_TILES]
    configs = [(f"splits {s}", s, None) for s in SWEEP_SPLITS]
    for t in tiles:
        for splits in (auto.splits, 2 * auto.splits):
            name = f"{t.BLOCK_M}x{t.BLOCK_N} w{t.num_warps} s{t.num_stages} splits {splits}"
            configs.append((name, splits, t))
    cells = {}
    for name, splits, tile in configs:

        def call(splits=splits, tile=tile):
            return flex_decode(q, k, v, score_mod=plan.score_mod, mask_mod=plan.mask_mod, tables=tables,
                               scale=plan.scale, positions=positions, splits=splits, tiles=tile)  # fmt: skip

        try:
            ms, _ = bench(call)
            cells[name] = round(2 * B * L * HKV * E * q.element_size() / (ms * 1e-3) / 1e12, 3)
        except Exception as err:  # noqa: BLE001 (a configuration that does not fit: say so, keep going)
            cells[name] = type(err).__name__
    return cells


SHORT_SHAPES = ((8, 32, 8, 128), (1, 4, 4, 64))  # (B, Hq, Hkv, E): this benchmark's, bench_host.py's
SHORT_LENGTHS = (256, 1024, 2048)


def short_caches(device) -> list[dict]:
    """The decode and the prefill kernel on the same plan over short caches (CUDA graphs, us): the
    data behind ``kernel_choice.choose_kernel`` sending short caches to the decode kernel."""
    results = []
    for shape in SHORT_SHAPES:
        for L in SHORT_LENGTHS:
            for lq in (1, 4):
                row = _short_row(*shape, L, lq, device)
                print(" | ".join(f"{key} {value}" for key, value in row.items()), flush=True)
                results.append(row)
    return results


def _short_row(b: int, hq: int, hkv: int, e: int, L: int, lq: int, device) -> dict:
    from flexattn.kernels.decode import flex_decode
    from flexattn.options import KernelOptions
    from flexattn.plan import plan_attention

    q = torch.randn(b, hq, lq, e, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, L, e, device=device, dtype=torch.bfloat16) for _ in range(2))
    plan = plan_attention(None, None, lq, L, e**-0.5, KernelOptions(BACKEND="TRITON"), torch.device(device),
                          q.dtype)  # fmt: skip
    calls = {
        "decode kernel": lambda: flex_decode(
            q, k, v, score_mod=plan.score_mod, mask_mod=plan.mask_mod, tables=None, scale=plan.scale
        ),
        "prefill kernel": lambda: _prefill(plan, q, k, v),
    }
    row = {"row": f"short B{b} Hq{hq} Hkv{hkv} E{e} KV {L} Lq{lq}"}
    for name, call in calls.items():
        ms, row[f"{name} timed"] = bench(call, rep=20)
        row[f"{name} us"] = round(ms * 1e3, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="list rows and kernel choices, launch nothing")
    parser.add_argument("--json", help="write the results here (rewritten after every row)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the split / tile sweep at the end")
    parser.add_argument("--quick", action="store_true", help="KV 8k and 32k only, no sweep (flexattn bench)")
    parser.add_argument(
        "--rows", nargs="*", metavar="TEXT",
        help="only the rows whose name contains one of these (as --dry-run prints them, e.g. 'KV 8k Lq1 ')",
    )  # fmt: skip
    parser.add_argument("--sweep-q-lens", nargs="+", type=int, default=[1, 16], help="query lengths swept")
    parser.add_argument("--sweep-variants", nargs="+", choices=VARIANTS, default=["noop"], help="variants")
    parser.add_argument("--sweep-kv", nargs="+", type=int, default=[8192, 32768], help="cache lengths swept")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep, no table rows")
    parser.add_argument("--short-caches", action="store_true", help="only the short-cache kernel rows")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run()
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU (use --dry-run to see the rows).")
    torch_flex = torch.compile(torch.nn.attention.flex_attention.flex_attention)
    device = "cuda"
    global _slopes
    _slopes = _slopes.to(device)
    print(
        f"{torch.cuda.get_device_name()} torch {torch.__version__}, B{B} Hq{HQ} Hkv{HKV} E{E} bf16",
        flush=True,
    )
    results, start = [], time.time()
    if args.short_caches:
        results = short_caches(device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)
        return 0
    for row in [] if args.sweep_only else rows():
        if args.quick and row.kv_len > 32768:
            continue
        if args.rows is not None and not any(text in f"{row} " for text in args.rows):
            continue
        result = run_row(row, torch_flex, device)
        results.append(result)
        print_row(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)
        torch.cuda.empty_cache()
    if not (args.no_sweep or args.quick):
        results += sweep(device, tuple(args.sweep_q_lens), tuple(args.sweep_variants), tuple(args.sweep_kv))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)
    print(f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
