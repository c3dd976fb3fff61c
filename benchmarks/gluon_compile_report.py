"""Compile the Gluon Hopper forward (``flexattn/kernels/hopper/forward_ws.py``) and backward
(``backward_ws.py``, ``--backward``) for sm_90a without a GPU.

The sibling of ``compile_report.py`` for Gluon kernels: the same stub driver names an H100/H200
target (sm_90a), Triton's ``warmup`` compiles the kernel without launching it, and this prints
registers and spills (``ptxas -v``), shared memory, and how many of Hopper's own instructions the
kernel holds: ``wgmma`` (SASS ``HGMMA``), TMA loads (``cp.async.bulk.tensor``, SASS ``UTMALDG``) and
register reallocation (``setmaxnreg``, SASS ``USETMAXREG``), with the setmaxnreg values.

Variants: ``noop`` (no block mask: every tile, no tables), or a block mask (partial + full lists)
with flexattn's compiled mods: ``causal``, ``sliding``, ``document``, ``alibi`` (ALiBi over causal),
``softcap`` (tanh soft-cap over causal).

    python benchmarks/gluon_compile_report.py                       # every head dim x variant, default tiles
    python benchmarks/gluon_compile_report.py --head-dim 128 --variant causal --stages 3
    python benchmarks/gluon_compile_report.py --head-dim 64 --variant noop --consumers 2 --no-v-fence
    python benchmarks/gluon_compile_report.py --backward --head-dim 128 --variant causal --length 1024
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile_report import _StubDriver, resources, sass_text  # noqa: E402

import flexattn.compiler as mod_compiler  # noqa: E402
import flexattn.variants as V  # noqa: E402
from flexattn.block_mask import create_block_mask  # noqa: E402
from flexattn.kernels.device import DeviceLimits  # noqa: E402
from flexattn.kernels.hopper.backward_ws import gluon_backward  # noqa: E402
from flexattn.kernels.hopper.choice import HEAD_DIMS, hopper_tiles  # noqa: E402
from flexattn.kernels.hopper.forward_ws import gluon_forward  # noqa: E402
from flexattn.kernels.paged_kv import PagedKV  # noqa: E402

H100 = DeviceLimits((9, 0), 232448)
LENGTH = 1000  # not a multiple of any tile: the compiled kernel has the tail paths (lengths are runtime)
VARIANTS = {  # name -> (score_mod, mask_mod) builders taking the query head count
    "noop": lambda heads: (None, None),
    "causal": lambda heads: (None, V.causal()),
    "sliding": lambda heads: (None, V.sliding_window(256)),
    "document": lambda heads: (None, V.document_mask(torch.arange(4096) // 300)),
    "alibi": lambda heads: (V.alibi(heads, device="cpu"), V.causal()),
    "softcap": lambda heads: (V.tanh_softcap(30.0), V.causal()),
}


@contextlib.contextmanager
def stub_driver():
    """Triton's active driver replaced by one that only names sm_90 (nothing can launch)."""
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_StubDriver())
    try:
        yield
    finally:
        driver._active = previous


def _compiled_variant(variant: str, q_heads: int, length: int):
    """(block tables or None, score KernelMod, mask KernelMod) of a variant at Lq = Lkv = ``length``,
    compiled for a CUDA target."""
    score, mask = VARIANTS[variant](q_heads)
    tables = None
    if mask is not None:
        tables = create_block_mask(mask, 1, 1, length, length, device="cpu", backend="torch").tables()
    return (
        tables,
        mod_compiler.compile_score_mod(score, target="cuda"),
        mod_compiler.compile_mask_mod(mask, target="cuda"),
    )


def compile_variant(
    head_dim: int, variant: str = "noop", dtype=torch.bfloat16, q_heads=2, kv_heads=1, length=LENGTH, page=0,
    **tiles,
):  # fmt: skip
    """The compiled kernel (Triton's CompiledKernel) for one head dim and variant; ``tiles`` override
    fields of the default ``HopperTiles`` (consumers, stages, pingpong, v_fence, ...). ``length``: of
    queries and keys (a multiple of 128 compiles the kernel without its tail paths). ``page`` > 0:
    K/V in a paged cache of that page size (a shuffled page table)."""
    tables, score_mod, mask_mod = _compiled_variant(variant, q_heads, length)
    q = torch.zeros(1, q_heads, length, head_dim, dtype=dtype)
    paged = None
    if page:
        n_pages = -(-length // page)
        kv = torch.zeros(1, kv_heads, n_pages * page, head_dim, dtype=dtype)
        table = torch.randperm(n_pages, generator=torch.Generator().manual_seed(0)).to(torch.int32)[None]
        paged = PagedKV(table, page, length)
    else:
        kv = torch.zeros(1, kv_heads, length, head_dim, dtype=dtype)
    default = hopper_tiles(
        head_dim=head_dim, q_block=None if tables is None else tables.q_block, tail=length % 128 != 0
    )
    chosen = dataclasses.replace(default, **tiles)
    with stub_driver():
        return gluon_forward(
            q, kv, kv, score_mod=score_mod, mask_mod=mask_mod, tables=tables, scale=head_dim**-0.5,
            tiles=chosen, target=H100, warmup=True, paged=paged,
        )  # fmt: skip


def compile_backward(
    head_dim: int, variant: str = "noop", dtype=torch.bfloat16, q_heads=2, kv_heads=1, length=LENGTH, **launch
):  # fmt: skip
    """The compiled Gluon backward for one head dim and variant (GQA 2, Lq = Lkv = ``length``);
    ``launch``: ``gluon_backward``'s keywords (stages, shared_ds, vec4, consumer_regs, ...).
    Variants with a non-additive score mod (soft-cap) are refused by the launcher."""
    tables, score_mod, mask_mod = _compiled_variant(variant, q_heads, length)
    q = torch.zeros(1, q_heads, length, head_dim, dtype=dtype)
    kv = torch.zeros(1, kv_heads, length, head_dim, dtype=dtype)
    lse = torch.zeros(1, q_heads, length)
    with stub_driver():
        return gluon_backward(
            q, kv, kv, q, lse, q, None, score_mod=score_mod, mask_mod=mask_mod, tables=tables,
            scale=head_dim**-0.5, target=H100, warmup=True, **launch,
        )  # fmt: skip


def instructions(kernel) -> dict:
    """Counts of Hopper instructions in the PTX and SASS, and the setmaxnreg values."""
    ptx = kernel.asm["ptx"]
    sass = sass_text(kernel)
    ops = Counter(re.findall(r"\b(HGMMA|UTMALDG|USETMAXREG|HMMA|LDL|STL|MUFU\.EX2)\b", sass))
    return {
        "ptx_wgmma": ptx.count("wgmma.mma_async"),
        "ptx_tma_loads": ptx.count("cp.async.bulk.tensor"),
        "ptx_setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
        "sass": dict(ops),
    }


def report(kernel) -> str:
    res, ins = resources(kernel), instructions(kernel)
    sass = ins["sass"]
    regs = ", ".join(f"{d} {n}" for d, n in ins["ptx_setmaxnreg"])
    return (f"{res['registers']} regs, spills {res['spill_stores']}/{res['spill_loads']} B, "
            f"smem {res['shared_memory']} B | wgmma {ins['ptx_wgmma']} (HGMMA {sass.get('HGMMA', 0)}), "
            f"TMA loads {ins['ptx_tma_loads']} (UTMALDG {sass.get('UTMALDG', 0)}), "
            f"setmaxnreg [{regs}] (USETMAXREG {sass.get('USETMAXREG', 0)}), "
            f"MUFU.EX2 {sass.get('MUFU.EX2', 0)}, "
            f"LDL/STL {sass.get('LDL', 0)}/{sass.get('STL', 0)}")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS)
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--stages", type=int)
    parser.add_argument("--pingpong", choices=("on", "off"), help="default: the tiles' default")
    parser.add_argument("--consumers", type=int, choices=(2, 3), help="consumer warpgroups (noop only: a "
                        "block mask fixes them to Q_BLOCK / 64)")  # fmt: skip
    parser.add_argument("--no-v-fence", action="store_true")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--length", type=int, default=LENGTH, help="a multiple of 128: no tail paths")
    parser.add_argument("--paged", type=int, default=0, metavar="PAGE", help="K/V in a paged cache")
    parser.add_argument("--backward", action="store_true", help="the Gluon backward (not soft-cap)")
    parser.add_argument("--per-warpgroup-dq", action="store_true", help="backward: shared_ds=False")
    parser.add_argument(
        "--tma-dq", type=int, nargs="?", const=32, choices=(32, 64), metavar="COLS",
        help="backward: dQ by TMA bulk reductions of [64, COLS] boxes (bare: 32)",
    )
    parser.add_argument("--late-dp", action="store_true", help="backward: dP's GEMM after P (late_dp)")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    tiles = {"stages": args.stages, "consumers": args.consumers}
    tiles = {name: value for name, value in tiles.items() if value is not None}
    if args.pingpong:
        tiles["pingpong"] = args.pingpong == "on"
    if args.no_v_fence:
        tiles["v_fence"] = False
    head_dims = [args.head_dim] if args.head_dim else list(HEAD_DIMS)
    variants = [args.variant] if args.variant else list(VARIANTS)
    if args.backward:
        launch = {"stages": args.stages} if args.stages else {}
        if args.per_warpgroup_dq:
            launch["shared_ds"] = False
        if args.tma_dq:
            launch.update(tma_dq=True, dq_box_cols=args.tma_dq)
        if args.late_dp:
            launch["late_dp"] = True
        for head_dim in head_dims:
            for variant in [v for v in variants if v != "softcap"]:
                kernel = compile_backward(head_dim, variant, dtype, length=args.length, **launch)
                print(
                    f"backward E{head_dim} {variant:9s} {launch or 'default'}: {report(kernel)}", flush=True
                )
        return
    for head_dim in head_dims:
        for variant in variants:
            kernel = compile_variant(head_dim, variant, dtype, length=args.length, page=args.paged, **tiles)
            paged = f" paged {args.paged}" if args.paged else ""
            print(f"E{head_dim} {variant:9s}{paged} {tiles or 'default tiles'}: {report(kernel)}", flush=True)


if __name__ == "__main__":
    main()
