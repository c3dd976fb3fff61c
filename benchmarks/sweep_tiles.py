"""Tile sweep for the forward and backward kernels on a CUDA GPU (a tuning tool, not a test).

Times a fixed list of launch configurations for a few (config, variant) cases through the
attention plan with explicit tiles (``AttentionPlan.forward/backward(..., tiles=...)``), checks every
candidate's output against the default's, and prints one line per candidate with the registers and
spills of the kernels it compiled. The fastest candidates inform the defaults in
``flexattn/kernels/tiles.py`` and ``backward_tiles.py``; BENCHMARKS.md records what was measured.

    python benchmarks/sweep_tiles.py --json sweep.json          # forward and backward
    python benchmarks/sweep_tiles.py --only forward --cases E64:noop
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import CONFIGS, Config, density, environment, make_variants  # noqa: E402

import flexattn  # noqa: E402
from flexattn.kernels import backward, forward  # noqa: E402
from flexattn.kernels.backward_tiles import BackwardTiles, choose_backward_tiles  # noqa: E402
from flexattn.kernels.tiles import Tiles  # noqa: E402
from flexattn.options import KernelOptions  # noqa: E402
from flexattn.plan import plan_attention  # noqa: E402

VARIANTS = ("noop", "causal", "alibi", "sliding_window_1024", "prefix_lm", "document", "softcap")
FORWARD_CASES = tuple(f"E{e}:{v}" for e in (128, 64) for v in VARIANTS)
BACKWARD_CASES = ("E128:noop", "E128:document", "E64:noop")

# per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma, pipeline_qk, warp_specialize,
# optionally max_registers)
FORWARD_CANDIDATES = {
    128: [
        (128, 128, 8, 2, True, True, False),
        (128, 64, 4, 3, True, False, False),
        (128, 64, 4, 4, True, False, False),
        (128, 64, 8, 3, True, False, False),
        (128, 128, 8, 2, True, False, True),
    ],
    64: [
        (128, 128, 4, 3, True, False, False),
        (128, 64, 4, 3, True, False, False, 168),
        (128, 128, 4, 2, True, False, False, 168),
        (128, 64, 4, 2, True, False, False, 168),
    ],
}
# per head dim: (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages, dq_mode, use_tma,
# optionally max_registers of the dK/dV kernel)
BACKWARD_CANDIDATES = {
    128: [
        (64, 128, 128, 64, 8, 2, "separate", False),
        (64, 128, 128, 64, 8, 2, "separate", True),
        (64, 64, 64, 64, 4, 3, "separate", True),
        (64, 64, 64, 64, 4, 2, "separate", True),
        (64, 64, 128, 64, 4, 2, "separate", True),
    ],
    64: [
        (64, 64, 64, 64, 4, 2, "separate", True),
        (64, 64, 64, 64, 4, 2, "separate", True, 168),
        (64, 64, 64, 64, 4, 3, "separate", True, 168),
        (32, 64, 64, 64, 4, 2, "separate", True, 168),
    ],
}


def forward_tiles_of(candidate) -> Tiles:
    m, n, warps, stages, tma, pipe, ws, *rest = candidate
    return Tiles(m, n, warps, stages, "sweep", use_tma=tma, pipeline_qk=pipe, warp_specialize=ws,
                 max_registers=rest[0] if rest else None)  # fmt: skip


def backward_tiles_of(candidate, base: BackwardTiles) -> BackwardTiles:
    m1, n1, m2, n2, warps, stages, mode, tma, *rest = candidate
    return replace(base, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2, num_warps=warps,
                   num_stages=stages, dq_mode=mode, use_tma=tma, max_registers=rest[0] if rest else None,
                   reason="sweep")  # fmt: skip


def compiled_kernels(*jit_functions) -> dict:
    """``(function name, cache key) -> (registers, spills)`` of every compiled kernel so far."""
    found = {}
    for fn in jit_functions:
        for caches in getattr(fn, "device_caches", {}).values():
            for key, kernel in caches[0].items():
                try:
                    kernel._init_handles()
                    found[(fn.__name__, str(key))] = (kernel.n_regs, kernel.n_spills)
                except Exception:  # an attribute renamed in another Triton: report nothing
                    pass
    return found


def resources(before: dict, after: dict) -> str:
    new = {k: v for k, v in after.items() if k not in before}
    return " ".join(f"{name.split('_', 2)[-1]}:{r}r/{s}s" for (name, _), (r, s) in new.items()) or "cached"


def run_case(case: str, which: str, args, rows: list) -> None:
    e, variant_name = case.split(":")
    cfg = next(c for c in CONFIGS if f"E{c.E}" == e)
    if args.shape:  # another (B, H, L) at this head dim
        cfg = Config(*args.shape[:3], cfg.E)
    var = next(v for v in make_variants(cfg, "cuda") if v.name == variant_name)
    q, k, v = (torch.randn(cfg.B, cfg.H, cfg.L, cfg.E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = flexattn.create_block_mask(
        var.mask_mod or flexattn.noop_mask, None, None, cfg.L, cfg.L, device="cuda"
    )
    flops = 4 * cfg.B * cfg.H * cfg.L * cfg.L * cfg.E * density(mask)
    score = var.flex_score_mod or var.score_mod
    kernels = (forward._flex_forward_kernel, backward._bwd_dkdv, backward._bwd_dq)
    plan = plan_attention(score, mask, cfg.L, cfg.L, cfg.E**-0.5, KernelOptions(), q.device)
    out, lse, _ = plan.forward(q, k, v)
    dout = torch.randn_like(out)
    base = choose_backward_tiles(cfg.E, cfg.E, q.dtype, *mask.BLOCK_SIZE, torch.cuda.get_device_capability(),
                                 KernelOptions(), light_score=plan.score_mod.light)  # fmt: skip

    def run(tiles=None):
        if which == "forward":
            return plan.forward(q, k, v, tiles=tiles)[0]
        return plan.backward(q, k, v, out, lse, dout, None, (), tiles=tiles)

    reference = run()
    candidates = (FORWARD_CANDIDATES if which == "forward" else BACKWARD_CANDIDATES)[cfg.E]
    for cand in candidates:
        started = time.time()
        before = compiled_kernels(*kernels)
        tiles = forward_tiles_of(cand) if which == "forward" else backward_tiles_of(cand, base)
        try:
            result = run(tiles)
            results = result if isinstance(result, tuple) else (result,)
            refs = reference if isinstance(reference, tuple) else (reference,)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results, refs))
            ms = triton.testing.do_bench(lambda t=tiles: run(t), warmup=200, rep=60, return_mode="median")
            tflops = (1.0 if which == "forward" else 2.5) * flops / ms / 1e9
            used = resources(before, compiled_kernels(*kernels))
            row = {"case": case, "which": which, "candidate": list(cand), "ms": ms, "tflops": tflops,
                   "max_diff_vs_default": diff, "kernels": used}  # fmt: skip
        except Exception as err:  # a configuration the compiler rejects: record it and go on
            message = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            row = {"case": case, "which": which, "candidate": list(cand), "error": message}
        row["seconds"] = round(time.time() - started, 1)
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


def format_row(row: dict) -> str:
    head = f"{row['which']:8s} {row['case']:28s} {str(tuple(row['candidate'])):44s}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    return (f"{head} {row['ms']:7.3f} ms {row['tflops']:5.0f} TF  diff {row['max_diff_vs_default']:.1e}  "
            f"{row['kernels']}  ({row['seconds']} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("forward", "backward"))
    parser.add_argument("--cases", nargs="*", help="cases as E<dim>:<variant>, e.g. E64:noop")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "H", "L"), help="instead of the paper's")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list = []
    for which, cases in (("forward", FORWARD_CASES), ("backward", BACKWARD_CASES)):
        if args.only in (None, which):
            for case in args.cases or cases:
                run_case(case, which, args, rows)


if __name__ == "__main__":
    main()
