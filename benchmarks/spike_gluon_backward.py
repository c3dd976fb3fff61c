"""The Gluon Hopper backward (issue #16) against flexattn's Triton backward, torch's compiled flex_attention
and SDPA, side by side on an sm_90 GPU (bf16, the backward alone).

Per config (B4 H16 L8192 E128, B4 H16 L16384 E64) and variant (noop, causal, ALiBi + causal, sliding
window 1024, 12 documents), each implementation runs its forward once and the backward is timed
(``torch.autograd.grad`` over the kept graph, median of ``triton.testing.do_bench``); dq, dk, dv are
compared with the Triton backward's (relative Frobenius difference, flagged when > 1e-2). TFLOP/s =
2.5 x 4*B*H*L*L*E x density / time; ratios to the Triton backward, to torch and to cuDNN (noop, causal).

    python benchmarks/spike_gluon_backward.py --json /tmp/gluon_bwd.json
    python benchmarks/spike_gluon_backward.py --head-dims 128 --variants noop causal --no-torch-flex
    python benchmarks/spike_gluon_backward.py --head-dims 64 --forms tma64 late-dp tma64+late-dp

``--forms``: the Gluon backward also in launcher forms the public API does not expose, each a
``+``-joined set of ``tma32`` / ``tma64`` (dQ by TMA reductions of 32- / 64-column boxes),
``late-dp`` (dP's GEMM after P) and ``per-wg`` (per-warpgroup dQ, no shared dS).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from spike_gluon_forward import _density, mods, rel, sdpa_impls  # noqa: E402

import flexattn  # noqa: E402
from flexattn import AuxRequest  # noqa: E402
from flexattn.options import KernelOptions  # noqa: E402
from flexattn.plan import plan_attention  # noqa: E402

CONFIGS = [(4, 16, 8192, 128), (4, 16, 16384, 64)]  # (B, H, L, E)
VARIANTS = ("noop", "causal", "alibi", "sliding", "document")
WRONG = 1e-2


FORM_ARGS = {
    "tma32": {"tma_dq": True, "dq_box_cols": 32},
    "tma64": {"tma_dq": True, "dq_box_cols": 64},
    "late-dp": {"late_dp": True},
    "per-wg": {"shared_ds": False},
}


def form_kwargs(form: str) -> dict:
    """``gluon_backward`` keywords of a ``--forms`` entry such as ``tma64+late-dp``."""
    kwargs = {}
    for token in form.split("+"):
        if token not in FORM_ARGS:
            raise SystemExit(f"--forms: unknown token {token!r} in {form!r}; choose from {sorted(FORM_ARGS)}")
        kwargs.update(FORM_ARGS[token])
    return kwargs


class _FormAttention(torch.autograd.Function):
    """flexattn's forward, and the Gluon backward in one launcher form (``gluon_backward(**launch)``)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, score_mod, block_mask, launch):
        aux = AuxRequest(lse=True)
        out, aux = flexattn.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, return_aux=aux
        )
        ctx.save_for_backward(q, k, v, out, aux.lse)
        ctx.plan, ctx.launch = plan, launch
        return out

    @staticmethod
    def backward(ctx, dout):
        from flexattn.kernels.hopper.backward_ws import gluon_backward

        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        tables = None if plan.dense else plan.backward_tables()
        grads = gluon_backward(
            q, k, v, out, lse, dout.contiguous(), None, score_mod=plan.score_mod, mask_mod=plan.mask_mod,
            tables=tables, scale=plan.scale, **ctx.launch,
        )  # fmt: skip
        return (*grads, None, None, None, None)


def implementations(q, k, v, variant, torch_flex: bool, forms: tuple[str, ...] = ()):
    """name -> zero-argument forward (its output is differentiated), and the block density."""
    B, H, L, E = q.shape
    score_mod, mask_mod = mods(variant, H, L)
    mask = None if mask_mod is None else flexattn.create_block_mask(mask_mod, None, None, L, L, device="cuda")
    density = 1.0 if mask is None else _density(mask)

    def ours(backward):
        options = {"BACKWARD_KERNEL": backward}
        return lambda: flexattn.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=mask, kernel_options=options
        )

    impls = {"flexattn-triton": ours("TRITON"), "gluon": ours("GLUON")}
    if forms:
        plan = plan_attention(score_mod, mask, L, L, E**-0.5, KernelOptions(), q.device, q.dtype)
        for form in forms:
            launch = form_kwargs(form)
            impls[f"gluon-{form}"] = lambda launch=launch: _FormAttention.apply(q, k, v, plan, score_mod, mask, launch)
    if torch_flex:
        from torch.nn.attention import flex_attention as torch_fa

        compiled = torch.compile(torch_fa.flex_attention)
        torch_mask = (
            None
            if mask_mod is None
            else torch_fa.create_block_mask(mask_mod, None, None, L, L, device="cuda")
        )
        impls["torch-flex-compiled"] = lambda: compiled(q, k, v, score_mod=score_mod, block_mask=torch_mask)
    impls.update(sdpa_impls(q, k, v, variant))
    return impls, density


def run_row(B, H, L, E, variant, torch_flex, rows, json_path, forms=()):
    import triton

    label = f"B{B} H{H} L{L} E{E} {variant}"
    print(f"\n== {label} (bf16, backward)", flush=True)
    torch.manual_seed(time.time_ns() % 2**31)
    q, k, v = (
        torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn_like(q)
    row = {"config": label, "tflops": {}, "rel_vs_triton": {}, "errors": {}}
    impls, density = implementations(q, k, v, variant, torch_flex, forms)
    total = 2.5 * 4 * B * H * L * L * E * density
    reference = None
    for name, forward in impls.items():
        try:
            out = forward()
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
            if reference is None:
                reference = grads
            row["rel_vs_triton"][name] = max(rel(g, r) for g, r in zip(grads, reference))
            del grads
            ms = triton.testing.do_bench(
                lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                warmup=25,
                rep=100,
                return_mode="median",
            )
            row["tflops"][name] = total / ms / 1e9
            del out
        except Exception as exc:  # one implementation's failure ends its cell, not the run
            row["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"  {name:22s} ERROR {row['errors'][name]}", flush=True)
    base, anchor, cudnn = (
        row["tflops"].get(n) for n in ("flexattn-triton", "torch-flex-compiled", "sdpa-cudnn")
    )
    for name, tf in row["tflops"].items():
        ratios = (f"  {tf / base:5.2f}x triton" if base else "") + (
            f"  {tf / anchor:5.2f}x torch" if anchor else ""
        )
        ratios += f"  {tf / cudnn:5.2f}x cuDNN" if cudnn else ""
        err = row["rel_vs_triton"][name]
        flag = "  !!!! WRONG !!!!" if err > WRONG else ""
        print(f"  {name:22s} {tf:7.1f} TFLOP/s{ratios}  rel {err:.1e}{flag}", flush=True)
    rows.append(row)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here (after every row)")
    parser.add_argument("--no-torch-flex", action="store_true")
    parser.add_argument(
        "--forms", nargs="*", default=[], help="also the Gluon backward in these launcher forms (docstring)"
    )
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--head-dims", type=int, nargs="*", default=[128, 64])
    parser.add_argument("--watchdog", type=float, default=560.0, help="exit after this many seconds")
    args = parser.parse_args()
    for form in args.forms:
        form_kwargs(form)  # unknown tokens refused before any work
    start = time.time()
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False  # compiled backwards timed over a retained graph
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows: list = []
    for B, H, L, E in CONFIGS:
        if E in args.head_dims:
            for variant in args.variants:
                run_row(B, H, L, E, variant, not args.no_torch_flex, rows, args.json, tuple(args.forms))
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
