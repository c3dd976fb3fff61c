"""The Gluon Hopper forward (issue #16) against flexattn's Triton forward, torch's compiled flex_attention
and SDPA, side by side on an sm_90 GPU (bf16, forward only).

1. correctness first: ``tests/kernels/test_hopper_forward_gpu.py`` in a child process with a time
   limit (a hung kernel cannot hold the GPU; Gluon is then skipped below and the rest still timed);
2. then per config (B4 H16 L8192 E128, B4 H16 L16384 E64) and variant (noop, causal, ALiBi + causal,
   tanh soft-cap 30 + causal, sliding window 1024, 12 documents): every implementation's output
   against flexattn's Triton forward (relative error, flagged when > 1e-2), and the median time
   (``triton.testing.do_bench``). TFLOP/s = 4*B*H*L*L*E x density (fraction of blocks visited) / time;
   ratios to the Triton forward and to cuDNN (noop and causal only: SDPA has no other variants).
   ``gluon`` is flex_attention with kernel_options PREFILL_KERNEL='GLUON'; ``gluon-nofence`` the same
   kernel without the V wait after the softmax (``HopperTiles.v_fence``), measured once here.

    python benchmarks/spike_gluon_forward.py --json /tmp/gluon.json     # H200, ~4 minutes
    python benchmarks/spike_gluon_forward.py --skip-tests --no-torch-flex  # the table only, faster
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flexattn  # noqa: E402
from flexattn import variants as V  # noqa: E402
from flexattn.options import KernelOptions  # noqa: E402
from flexattn.plan import plan_attention  # noqa: E402

CONFIGS = [(4, 16, 8192, 128), (4, 16, 16384, 64)]  # (B, H, L, E)
VARIANTS = ("noop", "causal", "alibi", "softcap", "sliding", "document")
WRONG = 1e-2  # relative (Frobenius) difference to flexattn's Triton forward that marks a row wrong


def mods(variant: str, H: int, L: int):
    """(score_mod, mask_mod) of a variant; the same Python functions serve every implementation."""
    return {
        "noop": (None, None),
        "causal": (None, V.causal()),
        "alibi": (V.alibi(H, device="cuda"), V.causal()),
        "softcap": (V.tanh_softcap(30.0), V.causal()),
        "sliding": (None, V.sliding_window(1024)),
        "document": (None, V.document_mask(torch.arange(L, device="cuda") * 12 // L)),
    }[variant]


def implementations(q, k, v, variant, torch_flex: bool) -> tuple[dict, float]:
    """name -> zero-argument call returning out, and the block density."""
    B, H, L, E = q.shape
    score_mod, mask_mod = mods(variant, H, L)
    mask = None if mask_mod is None else flexattn.create_block_mask(mask_mod, None, None, L, L, device="cuda")
    density = 1.0 if mask is None else _density(mask)

    def ours(options):
        return lambda: flexattn.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options
        )

    impls = {
        "flexattn-triton": ours({"PREFILL_KERNEL": "TRITON"}),
        "gluon": ours({"PREFILL_KERNEL": "GLUON"}),
    }
    plan = plan_attention(
        score_mod, mask, L, L, E**-0.5, KernelOptions(PREFILL_KERNEL="GLUON"), q.device, q.dtype
    )
    choice = plan.prefill_forward(q, k, v)
    if choice.kind == "gluon":
        from flexattn.kernels.hopper.forward_ws import gluon_forward

        nofence = dataclasses.replace(choice.tiles, v_fence=False)
        tables = None if plan.dense else plan.tables
        impls["gluon-nofence"] = lambda: gluon_forward(
            q,
            k,
            v,
            score_mod=plan.score_mod,
            mask_mod=plan.mask_mod,
            tables=tables,
            scale=plan.scale,
            tiles=nofence,
        )[0]
    if torch_flex:
        from torch.nn.attention import flex_attention as torch_fa

        compiled = torch.compile(torch_fa.flex_attention)
        torch_mask = None
        if mask_mod is not None:
            torch_mask = torch_fa.create_block_mask(mask_mod, None, None, L, L, device="cuda")
        impls["torch-flex-compiled"] = lambda: compiled(q, k, v, score_mod=score_mod, block_mask=torch_mask)
    impls.update(sdpa_impls(q, k, v, variant))
    return impls, density


def sdpa_impls(q, k, v, variant: str) -> dict:
    """SDPA's cuDNN and flash kernels for the variants SDPA can express (noop, causal), else none."""
    if variant not in ("noop", "causal"):
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    for name, backend in (
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
    ):

        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=variant == "causal")

        impls[name] = sdpa
    return impls


def _density(mask) -> float:
    visited = mask.kv_num_blocks.sum() + (
        0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum()
    )
    rows, cols = mask.kv_indices.shape[-2:]
    return float(visited) / (mask.kv_num_blocks.numel() * cols) if rows else 1.0


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_row(B, H, L, E, variant, gluon_ok, torch_flex, rows, json_path):
    import triton

    label = f"B{B} H{H} L{L} E{E} {variant}"
    print(f"\n== {label} (bf16)", flush=True)
    torch.manual_seed(time.time_ns() % 2**31)
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row = {"config": label, "tflops": {}, "rel_vs_triton": {}, "errors": {}}
    try:
        impls, density = implementations(q, k, v, variant, torch_flex)
    except Exception as exc:  # a setup failure ends the row, not the run
        print(f"  !! setup failed: {type(exc).__name__}: {exc}", flush=True)
        return
    if not gluon_ok:
        impls = {n: c for n, c in impls.items() if not n.startswith("gluon")}
    total = 4 * B * H * L * L * E * density
    reference = None
    for name, call in impls.items():
        try:
            with torch.no_grad():
                out = call()
                torch.cuda.synchronize()
                if reference is None:
                    reference = out
                err = rel(out, reference)
                row["rel_vs_triton"][name] = err
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            row["tflops"][name] = total / ms / 1e9
        except Exception as exc:
            row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"  {name:22s} ERROR {row['errors'][name]}", flush=True)
    ours, cudnn = row["tflops"].get("flexattn-triton"), row["tflops"].get("sdpa-cudnn")
    for name, tf in row["tflops"].items():
        err = row["rel_vs_triton"][name]
        ratios = (f"  {tf / ours:5.2f}x triton" if ours else "") + (
            f"  {tf / cudnn:5.2f}x cuDNN" if cudnn else ""
        )
        flag = "  !!!! WRONG !!!!" if err > WRONG else ""
        print(f"  {name:22s} {tf:7.1f} TFLOP/s{ratios}  rel {err:.1e}{flag}", flush=True)
    rows.append(row)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


def run_tests(timeout_s: float) -> bool:
    """The GPU correctness tests in a child process; False when they hung (Gluon is then skipped)."""
    print(f"== correctness: tests/kernels/test_hopper_forward_gpu.py (limit {timeout_s:.0f} s)", flush=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "tests/kernels/test_hopper_forward_gpu.py",
    ]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        print(output[-4000:], flush=True)
        print("!! THE TESTS TIMED OUT (a Gluon kernel hangs?): Gluon is skipped below", flush=True)
        return False
    print(done.stdout[-6000:], done.stderr[-2000:], sep="", flush=True)
    if done.returncode:
        print("!! CORRECTNESS TESTS FAILED: Gluon is still timed below (rows flag wrong results)", flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here (after every row)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=float, default=150.0)
    parser.add_argument("--no-torch-flex", action="store_true", help="skip torch's compiled flex_attention")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--watchdog", type=float, default=560.0, help="exit after this many seconds")
    args = parser.parse_args()
    start = time.time()
    faulthandler.dump_traceback_later(args.watchdog, exit=True)  # a hang at full size: say where, exit
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    gluon_ok = True if args.skip_tests else run_tests(args.test_timeout)
    rows: list = []
    for B, H, L, E in CONFIGS:
        for variant in args.variants:
            run_row(B, H, L, E, variant, gluon_ok, not args.no_torch_flex, rows, args.json)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
