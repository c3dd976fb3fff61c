"""Spike (issue #16): does a Gluon warp-specialized forward reach FlashAttention-3 speed on the H200?

For B4 H16 L8192 E128 and B4 H16 L16384 E64, noop and causal, bf16, on fresh random inputs:

1. correctness first: the Gluon kernel (each tile variant) and flexattn's Triton kernel against an
   fp32 reference (torch SDPA in float32 for out, a float32 logsumexp for lse) on a few heads, and
   Gluon against flexattn's Triton kernel on every head; failures are printed loudly, the run goes on;
2. then the median time (``triton.testing.do_bench``) of flexattn (Triton), every Gluon variant,
   SDPA cuDNN and SDPA flash; TFLOP/s = 4*B*H*L*L*E (/2 causal) / time, and ratios to cuDNN.

A hung Gluon kernel would hang the run, so a small smoke test of every Gluon variant (both head
dims, noop and causal, bf16 and fp16) runs first in a child process with a time limit; when it
fails or hangs, the main run skips Gluon and still times the rest. Compiled kernels land in
Triton's cache, so the main run does not compile them again.

    python benchmarks/spike_gluon_forward.py --json /tmp/spike.json     # H200, ~2 minutes
    python benchmarks/spike_gluon_forward.py --dry-run                  # no GPU: plan + sm_90a compile
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flexattn.kernels.hopper.forward_ws import flash_forward_ws, flops  # noqa: E402

CONFIGS = [(4, 16, 8192, 128), (4, 16, 16384, 64)]  # (B, H, L, E)
# Tile variants per head dim: (block_m per consumer warpgroup, block_n, stages, ping-pong).
VARIANTS = {
    128: [(64, 128, 2, True), (64, 128, 2, False), (64, 128, 3, True)],
    64: [(64, 128, 3, True), (64, 128, 3, False), (64, 128, 2, True)],
}
OUT_TOL, LSE_TOL = 2e-2, 2e-2  # relative error of out (Frobenius), max abs error of lse (bf16 inputs)


def variant_name(v) -> str:
    bm, bn, st, pp = v
    return f"gluon-m{2 * bm}x{bn}-s{st}{'-pp' if pp else ''}"


def run_gluon(q, k, v, causal, variant):
    bm, bn, st, pp = variant
    return flash_forward_ws(q, k, v, causal=causal, block_m=bm, block_n=bn, stages=st, pingpong=pp)


# -- references -------------------------------------------------------------------------------
def reference(q, k, v, causal, heads):
    """fp32 out (SDPA in float32) and lse (float32 logsumexp) for the (b, h) pairs in ``heads``."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for b, h in heads:
        qf, kf, vf = (t[b, h].float() for t in (q, k, v))  # (L, E)
        outs.append(F.scaled_dot_product_attention(qf[None], kf[None], vf[None], is_causal=causal)[0])
        rows = []
        for start in range(0, qf.shape[0], 2048):  # chunks of rows: (2048, L) fp32 scores at a time
            s = qf[start : start + 2048] @ kf.T * scale
            if causal:
                q_idx = torch.arange(start, start + s.shape[0], device=s.device)[:, None]
                s = s.masked_fill(torch.arange(s.shape[1], device=s.device)[None, :] > q_idx, -math.inf)
            rows.append(torch.logsumexp(s, dim=-1))
        lses.append(torch.cat(rows))
    return torch.stack(outs), torch.stack(lses)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def errors(out, lse, ref_out, ref_lse, heads) -> dict:
    o = torch.stack([out[b, h] for b, h in heads])
    ls = torch.stack([lse[b, h] for b, h in heads])
    return {"out_rel": rel(o, ref_out), "lse_max_abs": float((ls - ref_lse).abs().max())}


def verdict(err: dict) -> str:
    ok = err["out_rel"] < OUT_TOL and err["lse_max_abs"] < LSE_TOL and math.isfinite(err["out_rel"])
    return "ok" if ok else "FAIL"


def flexattn_call(causal, L, device):
    import flexattn

    mask = None
    if causal:
        mask = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device=device)

    def call(q, k, v):
        return flexattn.flex_attention(q, k, v, block_mask=mask, return_lse=True)

    return call


def sdpa_call(backend, causal):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=150, return_mode="median")


# -- smoke test (child process) ---------------------------------------------------------------
def smoke() -> int:
    """Small shapes, every variant, both dtypes: Gluon vs the fp32 reference. Exit code 1 on a failure."""
    failures = 0
    for E, variants in VARIANTS.items():
        for variant in variants:
            for causal in (False, True):
                for dtype in (torch.bfloat16, torch.float16):
                    if dtype == torch.float16 and variant != variants[0]:
                        continue
                    B, H, L = 2, 3, 1024
                    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype) for _ in range(3))
                    heads = [(0, 0), (1, 2)]
                    name = f"smoke {variant_name(variant)} E{E} L{L} {'causal' if causal else 'noop'} {dtype}"
                    try:
                        out, lse = run_gluon(q, k, v, causal, variant)
                        torch.cuda.synchronize()
                        err = errors(out, lse, *reference(q, k, v, causal, heads), heads)
                        v_ = verdict(err)
                        failures += v_ != "ok"
                        print(
                            f"{name}: {v_} out_rel {err['out_rel']:.2e} lse_max_abs {err['lse_max_abs']:.2e}"
                        )
                    except Exception:
                        failures += 1
                        print(f"{name}: ERROR\n{traceback.format_exc()}")
                    sys.stdout.flush()
    return 1 if failures else 0


def run_smoke_child(timeout_s: float) -> bool:
    print(f"== smoke test in a child process (limit {timeout_s:.0f} s)", flush=True)
    try:
        result = subprocess.run(
            [sys.executable, __file__, "--smoke"], timeout=timeout_s, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired as e:
        print((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        print("!! SMOKE TEST TIMED OUT (a Gluon kernel hangs?): Gluon is skipped in the main run", flush=True)
        return False
    print(result.stdout + result.stderr[-4000:], flush=True)
    if result.returncode != 0:
        print("!! SMOKE TEST FAILED: the main run still runs Gluon (errors are reported per row)", flush=True)
    return True


# -- main run ---------------------------------------------------------------------------------
def run_config(B, H, L, E, causal, gluon_ok, rows, json_path):
    from torch.nn.attention import SDPBackend

    label = f"B{B} H{H} L{L} E{E} {'causal' if causal else 'noop'} bf16"
    print(f"\n== {label}", flush=True)
    torch.manual_seed(int(time.time()))
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    heads = [(0, 0), (B - 1, H - 1)]
    ref_out, ref_lse = reference(q, k, v, causal, heads)
    total = flops(B, H, L, E, causal)
    row = {"config": label, "tflops": {}, "errors": {}}

    impls = {"flexattn-triton": flexattn_call(causal, L, q.device)}
    if gluon_ok:
        for variant in VARIANTS[E]:
            impls[variant_name(variant)] = lambda q, k, v, variant=variant: run_gluon(
                q, k, v, causal, variant
            )
    impls["sdpa-cudnn"] = sdpa_call(SDPBackend.CUDNN_ATTENTION, causal)
    impls["sdpa-flash"] = sdpa_call(SDPBackend.FLASH_ATTENTION, causal)

    triton_out = None
    for name, call in impls.items():
        try:
            with torch.no_grad():
                result = call(q, k, v)
            torch.cuda.synchronize()
            if isinstance(result, tuple):  # flexattn and Gluon return (out, lse): check them
                out, lse = result
                err = errors(out, lse, ref_out, ref_lse, heads)
                if name == "flexattn-triton":
                    triton_out = out
                elif triton_out is not None:
                    err["out_rel_vs_triton_all_heads"] = rel(out, triton_out)
                row["errors"][name] = err
                extra = "".join(f" {key} {val:.2e}" for key, val in err.items())
                flag = verdict(err)
                print(f"  {name:24s} {'correct' if flag == 'ok' else '!!!! WRONG !!!!'}:{extra}", flush=True)
                if flag != "ok":
                    row["wrong"] = row.get("wrong", []) + [name]  # still timed: a spike wants the speed too
            ms = bench_ms(lambda call=call: call(q, k, v))
            row["tflops"][name] = total / ms / 1e9
        except Exception as exc:
            print(f"  {name:24s} ERROR {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            row["errors"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    cudnn, ours = row["tflops"].get("sdpa-cudnn"), row["tflops"].get("flexattn-triton")
    for name, tf in row["tflops"].items():
        ratio = f"  {tf / cudnn:.2f}x cuDNN" if cudnn else ""
        ratio += f"  {tf / ours:.2f}x flexattn-triton" if ours else ""
        wrong = "  (WRONG RESULTS)" if name in row.get("wrong", []) else ""
        print(f"  {name:24s} {tf:7.1f} TFLOP/s{ratio}{wrong}", flush=True)
    rows.append(row)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


def dry_run() -> None:
    """Print the plan and compile every Gluon variant for sm_90a (no GPU needed)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gluon_compile_report import compile_variant, report

    for B, H, L, E in CONFIGS:
        for causal in (False, True):
            name = f"B{B} H{H} L{L} E{E} {'causal' if causal else 'noop'}"
            print(f"{name}: {flops(B, H, L, E, causal) / 1e12:.1f} TFLOP")
    for E, variants in VARIANTS.items():
        for variant in variants:
            for causal in (False, True):
                kernel = compile_variant(E, causal, variant)
                print(
                    f"E{E} {'causal' if causal else 'noop':6s} {variant_name(variant):22s} {report(kernel)}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: print the plan and compile for sm_90a"
    )
    parser.add_argument("--json", help="write the rows here (after every row)")
    parser.add_argument("--smoke", action="store_true", help="(child mode) only the small-shape smoke test")
    parser.add_argument("--smoke-timeout", type=float, default=150.0)
    parser.add_argument("--skip-smoke", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    if args.smoke:
        sys.exit(smoke())
    start = time.time()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    gluon_ok = True if args.skip_smoke else run_smoke_child(args.smoke_timeout)
    rows: list = []
    for B, H, L, E in CONFIGS:
        for causal in (False, True):
            run_config(B, H, L, E, causal, gluon_ok, rows, args.json)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
