"""Compile the Gluon Hopper forward (``flexattn/kernels/hopper/forward_ws.py``) for sm_90a without a GPU.

The sibling of ``compile_report.py`` for Gluon kernels: the same stub driver names an H100/H200
target (sm_90a), Triton's ``warmup`` compiles the kernel without launching it, and this prints
registers and spills (``ptxas -v``), shared memory, and how many of Hopper's own instructions the
kernel holds: ``wgmma`` (SASS ``HGMMA``), TMA loads (``cp.async.bulk.tensor``, SASS ``UTMALDG``) and
register reallocation (``setmaxnreg``, SASS ``USETMAXREG``), with the setmaxnreg values.

    python benchmarks/gluon_compile_report.py                       # every head dim x mask, default tiles
    python benchmarks/gluon_compile_report.py --head-dim 128 --causal --block-n 128 --stages 3
    python benchmarks/gluon_compile_report.py --head-dim 64 --consumers 3
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile_report import _StubDriver, resources, sass_text  # noqa: E402

from flexattn.kernels.hopper.forward_ws import DEFAULT_TILES, flash_forward_ws  # noqa: E402


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


def compile_variant(head_dim: int, causal: bool, variant=None, dtype=torch.bfloat16, **kwargs):
    """The compiled kernel (Triton's CompiledKernel) for one head dim, mask and tile variant.

    ``variant`` is (block_m, block_n, stages, pingpong, consumers[, v_fence]) or None for the defaults."""
    bm, bn, st, pp, nc, *fence = variant or DEFAULT_TILES[head_dim]
    kwargs.setdefault("v_fence", fence != [False])
    q = torch.zeros(1, 1, 4 * max(bm, bn), head_dim, dtype=dtype)
    with stub_driver():
        return flash_forward_ws(q, q, q, causal=causal, block_m=bm, block_n=bn, stages=st, pingpong=pp,
                                consumers=nc, warmup=True, **kwargs)  # fmt: skip


def instructions(kernel) -> dict:
    """Counts of Hopper instructions in the PTX and SASS, and the setmaxnreg values."""
    ptx = kernel.asm["ptx"]
    sass = sass_text(kernel)
    ops = Counter(re.findall(r"\b(HGMMA|UTMALDG|USETMAXREG|HMMA|LDL|STL)\b", sass))
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
            f"LDL/STL {sass.get('LDL', 0)}/{sass.get('STL', 0)}")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, choices=sorted(DEFAULT_TILES))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--block-m", type=int, help="rows per consumer warpgroup")
    parser.add_argument("--block-n", type=int)
    parser.add_argument("--stages", type=int)
    parser.add_argument("--pingpong", choices=("on", "off"), help="default: the head dim's default")
    parser.add_argument("--consumers", type=int, choices=(2, 3), help="consumer warpgroups")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    combos = (
        [(args.head_dim, args.causal)] if args.head_dim else [(e, c) for e in DEFAULT_TILES for c in (0, 1)]
    )
    for head_dim, causal in combos:
        bm, bn, st, pp, nc = DEFAULT_TILES[head_dim]
        pp = pp if args.pingpong is None else args.pingpong == "on"
        variant = (args.block_m or bm, args.block_n or bn, args.stages or st, pp, args.consumers or nc)
        kernel = compile_variant(head_dim, bool(causal), variant, dtype)
        print(f"E{head_dim} {'causal' if causal else 'noop  '} {variant}: {report(kernel)}")


if __name__ == "__main__":
    main()
