"""Compile flexattn's kernels for a GPU on a machine without one, and report what the compiler made.

Triton compiles for any target without a driver. This tool stands in a stub driver for an H100
(sm_90a), runs the real launchers with small CPU tensors so that every kernel they would launch is
compiled with the real default tiles (and never launched), and prints per kernel: registers and
spilled bytes (``ptxas -v`` on the PTX), shared memory, and for every loop of the SASS its instruction
count and commonest opcodes (``cuobjdump`` from Triton's own CUDA tools). It answers "did this
change add spills, shared memory or instructions to the inner loop?" at no device time; the
backward rework in BENCHMARKS.md started from such a count. It relies on Triton internals (the
driver and ``JITFunction.run``), checked against Triton 3.6.

    python benchmarks/compile_report.py                                  # backward, E128, noop
    python benchmarks/compile_report.py --pass forward --head-dim 64 --variant causal
    python benchmarks/compile_report.py --options '{"bwd_num_stages": 3}' --sass-dir /tmp/sass
    python benchmarks/compile_report.py --pass forward --paged 16                # K/V through a page table
    python benchmarks/compile_report.py --pass decode --variant causal+alibi --q-len 8  # split-KV decode
    python benchmarks/compile_report.py --pass decode --options '{"DECODE_MERGE": "KERNEL"}'  # + merge kernel
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as triton_jit

import flexattn.compiler as mod_compiler
import flexattn.variants as variants
from flexattn.block_mask import create_block_mask
from flexattn.block_mask_build import complete_q_side
from flexattn.kernels import backward, decode, forward
from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.launch import LaunchCache
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.positions import Positions
from flexattn.options import KernelOptions

H100 = DeviceLimits((9, 0), 232448)  # compute capability, opt-in shared memory per block
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
VARIANTS = {  # name -> (mask_mod, score_mod builder taking the head count)
    "noop": (None, None),
    "causal": (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None),
    "alibi": (None, lambda heads: variants.alibi(heads, device="cpu")),
    "softcap": (None, lambda heads: variants.tanh_softcap(30.0)),
    "relbias": (None, lambda heads: _relative_bias(heads)),
    "causal+alibi": (
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
        lambda heads: variants.alibi(heads, device="cpu"),
    ),
}
DECODE_HEADS = (32, 8)  # the decode benchmark's query and kv heads (GQA packing of 4 heads per tile)


def _relative_bias(heads: int, length: int = 512):
    """A learnable relative-position table (heads, 2 * length - 1), as in bench_attention.py."""
    table = torch.randn(heads, 2 * length - 1, requires_grad=True)
    return lambda score, b, h, q_idx, kv_idx: score + table[h, q_idx - kv_idx + length - 1]


class _StubDriver:
    """Just enough of Triton's CUDA driver for compiling (nothing here can launch)."""

    def get_current_target(self):
        return GPUTarget("cuda", H100.capability[0] * 10 + H100.capability[1], 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(compiled: list):
    """Kernels launched inside are compiled for sm_90a and appended to ``compiled`` as (name, kernel).

    Only Triton is stood in for (its driver, and JITFunction.run compiling instead of launching);
    flexattn is steered through its arguments: ``target=H100`` for the launchers, ``target="cuda"``
    for the mod compiler."""
    run = triton_jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    def through_triton(self, grid, key, args, keywords, pinned=(), call_ints=()):  # LaunchCache: compile all
        return self.fn[grid](*args, **keywords())

    driver = triton.runtime.driver
    previous = driver._active  # None until something asked for a driver (there may be no GPU one)
    driver.set_active(_StubDriver())
    try:
        with (
            mock.patch.object(triton_jit.JITFunction, "run", compile_instead),
            mock.patch.object(LaunchCache, "launch", through_triton),
        ):
            yield
    finally:
        driver._active = previous


def compile_kernels(
    which: str, head_dim: int, variant: str, options: dict, length: int = 512, page: int = 0, q_len: int = 1
) -> list:
    """Compile the kernels of one forward (``which="forward"``), decode (the split-KV kernels for
    ``q_len`` query tokens at the end of the sequence, the decode benchmark's heads) or backward pass;
    returns (name, kernel). ``page`` > 0: K/V from a paged cache of that page size (forward, decode)."""
    B, H = 1, 2
    q, k, v = (torch.randn(B, H, length, head_dim, dtype=torch.bfloat16) for _ in range(3))
    if which == "decode":
        H, Hkv = DECODE_HEADS
        q = torch.randn(B, H, q_len, head_dim, dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, length, head_dim, dtype=torch.bfloat16) for _ in range(2))
    paged = None
    if page:
        if which == "backward":
            raise SystemExit(
                "--paged compiles the forward and decode passes only (paged caches are inference only)"
            )
        table = torch.arange(length // page, dtype=torch.int32).flip(0)[None]  # (1, pages)
        paged = PagedKV(table, page, length)
        k, v = k[:1], v[:1]  # the caches (1, Hkv, pages * page, E)
    mask_fn, score_builder = VARIANTS[variant]
    mask = create_block_mask(mask_fn or _always, None, None, length, length, device="cpu")
    opts = KernelOptions.from_user(options)
    compiled: list = []
    with compile_only(compiled):
        score_fn = None if score_builder is None else score_builder(H)
        score = mod_compiler.compile_score_mod(score_fn, device="cpu", target="cuda", fast_math=True)
        mask_mod = mod_compiler.compile_mask_mod(mask_fn, device="cpu", target="cuda")
        common = {
            "score_mod": score,
            "mask_mod": mask_mod,
            "scale": head_dim**-0.5,
            "options": opts,
            "target": H100,
        }
        if which == "forward":
            forward.flex_forward(q, k, v, tables=mask.tables(), paged=paged, **common)
        elif which == "decode":  # as flex_attention decodes: no block mask without a mask_mod
            tables = None if mask_fn is None and paged is None else mask.tables()
            del common["options"]
            positions = Positions(q_offset=length - q_len)
            decode.flex_decode(
                q, k, v, tables=tables, positions=positions, paged=paged, merge=opts.DECODE_MERGE, **common
            )
        else:
            lse = torch.zeros(B, H, length)
            grads = tuple(torch.zeros(t.shape) for t in score.grad_captures)  # learnable captures' buffers
            backward.flex_backward(
                q, k, v, q, lse, q, None, tables=complete_q_side(mask.tables()), grad_buffers=grads, **common
            )
    return compiled


def _always(b, h, q_idx, kv_idx):
    return q_idx >= 0


def resources(kernel) -> dict:
    """Registers and spills (``ptxas -v``) and shared memory of one compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        arch = f"--gpu-name=sm_{H100.capability[0]}{H100.capability[1]}a"
        result = subprocess.run(
            [str(NVIDIA_BIN / "ptxas"), "-v", arch, str(ptx), "-o", str(ptx.with_suffix(".o"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = result.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared_memory": kernel.metadata.shared,
    }


def sass_text(kernel) -> str:
    """The SASS of one compiled kernel (``cuobjdump -sass`` of its cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout


def sass_loops(kernel, keep: Path | None = None, name: str = "kernel") -> list[dict]:
    """Every backward branch of the SASS (a loop): address range, instruction count, commonest opcodes."""
    sass = sass_text(kernel)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{name}.sass").write_text(sass)
    instructions = []  # (address, opcode)
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            instructions.append((int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)))
    # Out-of-line stubs after the last EXIT (barrier-wait retries) branch back into loop bodies: not loops.
    last_exit = max((a for a, op, _ in instructions if op == "EXIT"), default=float("inf"))
    loops = []
    for address, opcode, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest) if opcode == "BRA" and address < last_exit else None
        if target and int(target.group(1), 16) < address and address - int(target.group(1), 16) > 64:
            start = int(target.group(1), 16)
            body = Counter(op for a, op, _ in instructions if start <= a <= address)
            loops.append({"start": start, "end": address, "instructions": sum(body.values()),
                          "top": body.most_common(6)})  # fmt: skip
    return loops


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pass", dest="which", choices=("forward", "decode", "backward"), default="backward")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="noop")
    parser.add_argument("--options", type=json.loads, default={}, help="kernel_options as JSON")
    parser.add_argument("--sass-dir", type=Path, help="also write each kernel's SASS here")
    parser.add_argument(
        "--paged", type=int, default=0, metavar="PAGE", help="forward / decode over a paged cache"
    )
    parser.add_argument("--q-len", type=int, default=1, help="query tokens of a decode step (--pass decode)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_report.py compiles real kernels: unset TRITON_INTERPRET to run it.")
    rows = []
    kernels = compile_kernels(
        args.which, args.head_dim, args.variant, args.options, page=args.paged, q_len=args.q_len
    )
    for name, kernel in kernels:
        row = {"kernel": name, **resources(kernel), "loops": sass_loops(kernel, args.sass_dir, name)}
        rows.append(row)
        spills = f"{row['spill_stores']}/{row['spill_loads']}"
        print(f"{name}: {row['registers']} registers, spills {spills} bytes (stores/loads), "
              f"{row['shared_memory']} bytes shared memory")  # fmt: skip
        for loop in row["loops"]:
            top = ", ".join(f"{op} {n}" for op, n in loop["top"])
            print(f"  loop {loop['start']:#x}-{loop['end']:#x}: {loop['instructions']} instructions ({top})")
    return rows


if __name__ == "__main__":
    main()
