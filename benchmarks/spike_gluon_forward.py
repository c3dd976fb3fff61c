"""Spike (issue #16): does a Gluon warp-specialized forward reach FlashAttention-3 speed on the H200?

For B4 H16 L8192 E128 and B4 H16 L16384 E64, noop and causal, bf16, on fresh random inputs:

1. correctness first: the Gluon kernel (each tile variant) and flexattn's Triton kernel against an
   fp32 reference (torch SDPA in float32 for out, a float32 logsumexp for lse) on two heads, and
   Gluon against flexattn's Triton kernel on every head; failures are printed loudly, the run goes on
   (a wrong kernel is still timed, and marked);
2. then the median time (``triton.testing.do_bench``) of flexattn (Triton), every Gluon variant,
   SDPA cuDNN and SDPA flash; TFLOP/s = 4*B*H*L*L*E (/2 causal) / time, and ratios to cuDNN and to
   flexattn's Triton kernel. Causal rows also time the Gluon kernel with flexattn's compiled causal
   mask_mod inlined (``-mod``) instead of its built-in mask: the cost of the generated code.

A hung Gluon kernel would hang the run, so a smoke test of every Gluon variant (both head dims, noop
and causal, bf16 and fp16, plus compiled mods: document mask, tanh soft-cap, ALiBi) on small shapes
runs first in parallel child processes with a time limit; when one hangs, the main run skips Gluon
and still times the rest. Compiled kernels land in Triton's cache (sizes are not specialized), so
the main run does not compile them again.

    python benchmarks/spike_gluon_forward.py --json /tmp/spike.json     # H200, ~2-3 minutes
    python benchmarks/spike_gluon_forward.py --dry-run                  # no GPU: plan + sm_90a compile
"""

from __future__ import annotations

import argparse
import faulthandler
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
# Variants per head dim: (block_m per consumer warpgroup, block_n, stages, ping-pong, consumer
# warpgroups[, v_fence]); the first is the default (DEFAULT_TILES); v_fence=False measures the V wait
# that keeps the softmax overlapped with the P V (98d0a39). Three consumers (192-row CTAs, 160
# registers each, FA3's hdim-64 shape) spill at E128 (and 32 bytes at E64 causal). H200 runs of
# 2026-12-02 (TFLOP/s, noop / causal; before the V wait that keeps the softmax overlapped): E128
# 2 stages 601-607/557 with ping-pong, 617-620/554-558 without, 3 stages 557-596/550-557; E64 three
# consumers 2 stages 512/464, 3 stages 497/437 (ping-pong); two consumers 441-457/408-423.
VARIANTS = {
    128: [
        (64, 128, 2, False, 2),
        (64, 128, 2, True, 2),
        (64, 128, 3, False, 2),
        (64, 128, 2, False, 2, False),
    ],
    64: [
        (64, 128, 2, True, 3),
        (64, 128, 2, False, 3),
        (64, 128, 3, True, 3),
        (64, 128, 2, True, 2),
        (64, 128, 2, True, 3, False),
    ],
}
OUT_TOL, LSE_TOL = 2e-2, 2e-2  # relative error of out (Frobenius), max abs error of lse (bf16 inputs)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def variant_name(v) -> str:
    bm, bn, st, pp, nc, *fence = v
    return f"gluon-{nc}wg-m{nc * bm}x{bn}-s{st}{'-pp' if pp else ''}{'' if fence != [False] else '-nofence'}"


def run_gluon(q, k, v, causal, variant, score_mod=None, mask_mod=None):
    """The Gluon kernel; score_mod / mask_mod are compiled KernelMods (or None)."""
    bm, bn, st, pp, nc, *fence = variant
    tiles = dict(block_m=bm, block_n=bn, stages=st, pingpong=pp, consumers=nc, v_fence=fence != [False])
    return flash_forward_ws(q, k, v, causal=causal, score_mod=score_mod, mask_mod=mask_mod, **tiles)


# -- references -------------------------------------------------------------------------------
def reference(q, k, v, causal, heads, score_mod=None, mask_mod=None):
    """fp32 out and lse (natural log) for the (b, h) pairs in ``heads``: (len(heads), L, E), (len(heads), L).

    Without mods, out is torch SDPA in float32; lse (and out with mods) come from float32 scores in
    chunks of 2048 rows. Mods are the user's Python functions, applied by broadcasting."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for b, h in heads:
        qf, kf, vf = (t[b, h].float() for t in (q, k, v))  # (L, E)
        L = qf.shape[0]
        kv_idx = torch.arange(L, device=q.device)[None, :]
        bt, ht = torch.tensor(b, device=q.device), torch.tensor(h, device=q.device)
        rows, out_rows = [], []
        for start in range(0, L, 2048):  # (2048, L) fp32 scores at a time
            s = qf[start : start + 2048] @ kf.T * scale
            q_idx = torch.arange(start, start + s.shape[0], device=q.device)[:, None]
            if score_mod is not None:
                s = score_mod(s, bt, ht, q_idx, kv_idx)
            keep = torch.ones_like(s, dtype=torch.bool)
            if causal:
                keep &= q_idx >= kv_idx
            if mask_mod is not None:
                keep &= mask_mod(bt, ht, q_idx, kv_idx)
            s = s.masked_fill(~keep, -math.inf)
            rows.append(torch.logsumexp(s, dim=-1))
            if score_mod is not None or mask_mod is not None:
                out_rows.append(torch.softmax(s, dim=-1) @ vf)
        lses.append(torch.cat(rows))
        if out_rows:
            outs.append(torch.cat(out_rows))
        else:
            outs.append(F.scaled_dot_product_attention(qf[None], kf[None], vf[None], is_causal=causal)[0])
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


def compiled(kind, mod, device):
    import flexattn.compiler as C

    return (C.compile_score_mod if kind == "score" else C.compile_mask_mod)(mod, device=device)


def flexattn_call(causal, L, device):
    import flexattn

    mask = flexattn.create_block_mask(_causal, None, None, L, L, device=device) if causal else None

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
def smoke_cases():
    """(name, E, dtype, causal, variant, score_mod, mask_mod) for the small-shape smoke test."""
    from flexattn import variants as V

    cases = []
    for E, variants in VARIANTS.items():
        for variant in variants:
            for causal in (False, True):
                for dtype in (torch.bfloat16, torch.float16) if variant == variants[0] else (torch.bfloat16,):
                    cases.append((E, dtype, causal, variant, None, None))
    doc_ids = V.document_ids_from_lengths(torch.tensor([300, 500, 224])).repeat(2, 1).cuda()
    default = VARIANTS[128][0]
    cases += [
        (128, torch.bfloat16, True, default, None, _causal),
        (128, torch.bfloat16, False, default, None, V.document_mask(doc_ids)),
        (128, torch.bfloat16, False, default, V.tanh_softcap(30.0), None),
        (64, torch.bfloat16, True, VARIANTS[64][0], V.alibi(3, device="cuda"), None),
        (64, torch.bfloat16, False, VARIANTS[64][2], None, V.document_mask(doc_ids)),  # three consumers
    ]
    return cases


def smoke(shard: int, shards: int) -> int:
    """Small shapes, every variant, both dtypes, a few compiled mods: Gluon vs the fp32 reference.

    Runs every ``shards``-th case starting at ``shard`` (children run in parallel, compiling at once)."""
    failures = 0
    for E, dtype, causal, variant, score_mod, mask_mod in smoke_cases()[shard::shards]:
        B, H, L = 2, 3, 1024
        q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype) for _ in range(3))
        heads = [(0, 0), (1, 2)]
        mods = "".join(f" {kind}={getattr(m, '__name__', 'mod')}" for kind, m in (("score", score_mod),
                       ("mask", mask_mod)) if m is not None)  # fmt: skip
        name = f"smoke {variant_name(variant)} E{E} L{L} {'causal' if causal else 'noop'} {dtype}{mods}"
        try:
            km_score = None if score_mod is None else compiled("score", score_mod, q.device)
            km_mask = None if mask_mod is None else compiled("mask", mask_mod, q.device)
            out, lse = run_gluon(q, k, v, causal, variant, km_score, km_mask)
            torch.cuda.synchronize()
            err = errors(out, lse, *reference(q, k, v, causal, heads, score_mod, mask_mod), heads)
            flag = verdict(err)
            failures += flag != "ok"
            print(f"{name}: {flag} out_rel {err['out_rel']:.2e} lse_max_abs {err['lse_max_abs']:.2e}")
        except Exception:
            failures += 1
            print(f"{name}: ERROR\n{traceback.format_exc()}")
        sys.stdout.flush()
    print(f"smoke shard {shard}/{shards}: {failures} failure(s)")
    return 1 if failures else 0


def run_smoke_children(timeout_s: float, shards: int) -> bool:
    """The smoke test in ``shards`` parallel child processes; False when one hung (Gluon is skipped)."""
    print(f"== smoke test in {shards} child processes (limit {timeout_s:.0f} s)", flush=True)
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--smoke", f"{i}/{shards}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(shards)
    ]
    deadline, hung, failed = time.time() + timeout_s, False, False
    for child in children:
        try:
            output, _ = child.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate()
            hung = True
        print(output[-6000:], end="", flush=True)
        failed |= child.returncode != 0
    if hung:
        print("!! SMOKE TEST TIMED OUT (a Gluon kernel hangs?): Gluon is skipped in the main run", flush=True)
    elif failed:
        print("!! SMOKE TEST FAILED: the main run still runs Gluon (errors are reported per row)", flush=True)
    return not hung


# -- main run ---------------------------------------------------------------------------------
def implementations(E, causal, L, device, gluon_ok) -> dict:
    from torch.nn.attention import SDPBackend

    impls = {"flexattn-triton": flexattn_call(causal, L, device)}
    if gluon_ok:
        for variant in VARIANTS[E]:
            impls[variant_name(variant)] = lambda q, k, v, variant=variant: run_gluon(
                q, k, v, causal, variant
            )
        if causal:
            default = VARIANTS[E][0]
            mask = compiled("mask", _causal, device)
            impls[variant_name(default) + "-mod"] = lambda q, k, v: run_gluon(
                q, k, v, True, default, None, mask
            )
    impls["sdpa-cudnn"] = sdpa_call(SDPBackend.CUDNN_ATTENTION, causal)
    impls["sdpa-flash"] = sdpa_call(SDPBackend.FLASH_ATTENTION, causal)
    return impls


def run_config(B, H, L, E, causal, gluon_ok, rows, json_path):
    label = f"B{B} H{H} L{L} E{E} {'causal' if causal else 'noop'} bf16"
    print(f"\n== {label}", flush=True)
    torch.manual_seed(time.time_ns() % 2**31)
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    heads = [(0, 0), (B - 1, H - 1)]
    ref_out, ref_lse = reference(q, k, v, causal, heads)
    total = flops(B, H, L, E, causal)
    row = {"config": label, "tflops": {}, "errors": {}, "wrong": []}
    triton_out = None
    try:
        impls = implementations(E, causal, L, q.device, gluon_ok)
    except Exception as exc:
        print(f"  !! could not set up the implementations: {type(exc).__name__}: {exc}", flush=True)
        return
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
                print(f"  {name:28s} {'correct' if flag == 'ok' else '!!!! WRONG !!!!'}:{extra}", flush=True)
                if flag != "ok":
                    row["wrong"].append(name)  # still timed: a spike wants the speed too
            ms = bench_ms(lambda call=call: call(q, k, v))
            row["tflops"][name] = total / ms / 1e9
        except Exception as exc:
            print(f"  {name:28s} ERROR {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            row["errors"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    cudnn, ours = row["tflops"].get("sdpa-cudnn"), row["tflops"].get("flexattn-triton")
    for name, tf in row["tflops"].items():
        ratio = f"  {tf / cudnn:.2f}x cuDNN" if cudnn else ""
        ratio += f"  {tf / ours:.2f}x flexattn-triton" if ours else ""
        wrong = "  (WRONG RESULTS)" if name in row["wrong"] else ""
        print(f"  {name:28s} {tf:7.1f} TFLOP/s{ratio}{wrong}", flush=True)
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
    parser.add_argument("--smoke", metavar="I/N", help="(child mode) only shard I of N of the smoke test")
    parser.add_argument("--smoke-timeout", type=float, default=150.0)
    parser.add_argument("--smoke-shards", type=int, default=4, help="parallel smoke-test processes")
    parser.add_argument("--skip-smoke", action="store_true")
    parser.add_argument("--watchdog", type=float, default=420.0, help="exit after this many seconds")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    if args.smoke:
        shard, shards = (int(x) for x in args.smoke.split("/"))
        sys.exit(smoke(shard, shards))
    start = time.time()
    # a kernel that hangs at the full sizes: print where, and exit, instead of holding the GPU
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    gluon_ok = True if args.skip_smoke else run_smoke_children(args.smoke_timeout, args.smoke_shards)
    rows: list = []
    for B, H, L, E in CONFIGS:
        for causal in (False, True):
            run_config(B, H, L, E, causal, gluon_ok, rows, args.json)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
