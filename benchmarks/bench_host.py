"""Host time per call: flexattn next to torch's flex_attention and SDPA, side by side in one process.

At decode sizes the host path (argument checks, mod lookup, tile choice, allocations, the launch)
costs more than the GPU work. This measures it: wall-clock microseconds per call over ``--calls``
calls after a warm-up, median of ``--repeats`` rounds, for

- ``flexattn``: ``flexattn.flex_attention`` (eager; the decode kernel merges its splits in the same
  launch, the default); ``flexattn-merge-kernel`` the same with kernel_options
  ``DECODE_MERGE="KERNEL"`` (a second launch merges them);
- ``torch-compiled`` / ``torch-eager``: ``torch.nn.attention.flex_attention`` under ``torch.compile``
  and without it, masks from torch's own ``create_block_mask``;
- ``sdpa``: ``F.scaled_dot_product_attention`` (noop; causal via ``is_causal``).

Cases: B1 H4 E64 with Lq = Lkv = 256 (noop, causal), a decode step Lq = 1 over Lkv = 256 and over Lkv =
8192 (both the split-KV decode kernel). On
CUDA the loop launches without synchronising (the kernels are shorter than the host path), so the
time is the host's; ``wall+sync`` adds the final synchronisation. On CPU every implementation runs its
CPU path (flexattn: the reference backend), so the numbers include the math.

``--simulate-launch`` (CPU, no GPU needed) runs flexattn's Triton path on CPU tensors as on an
H100: the kernels are really compiled for sm_90a and Triton's launch machinery (argument binding,
specialisation key, kernel lookup) really runs, but a stub driver's launcher does nothing. It
measures the host path of a GPU call on a machine without one, like ``compile_report.py`` it
relies on Triton 3.6 internals (the driver interface).

    python benchmarks/bench_host.py                               # the table (on the GPU if there is one)
    python benchmarks/bench_host.py --device cuda --json host.json
    python benchmarks/bench_host.py --simulate-launch             # flexattn's GPU host path on CPU
    python benchmarks/bench_host.py --breakdown decode            # cProfile's top entries, flexattn
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn.functional as F

import flexattn

B, H, E = 1, 4, 64


@dataclass(frozen=True)
class Case:
    name: str
    q_len: int
    kv_len: int
    causal: bool


CASES = {
    c.name: c
    for c in (
        Case("noop", 256, 256, False),
        Case("causal", 256, 256, True),
        Case("decode", 1, 256, False),
        Case("decode-8k", 1, 8192, False),
    )
}  # fmt: skip  (decode, decode-8k: the decode kernel; noop, causal: the prefill kernel)
IMPLS = ("flexattn", "flexattn-merge-kernel", "torch-compiled", "torch-eager", "sdpa")
FLEXATTN = {"flexattn": {}, "flexattn-merge-kernel": {"DECODE_MERGE": "KERNEL"}}  # kernel_options per impl


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_call(impl: str, case: Case, device: str, dtype: torch.dtype, options: dict | None) -> Callable:
    """A no-argument function running one call of ``impl`` on fresh inputs for ``case``."""
    q = torch.randn(B, H, case.q_len, E, device=device, dtype=dtype)
    k, v = (torch.randn(B, H, case.kv_len, E, device=device, dtype=dtype) for _ in range(2))
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    if impl in FLEXATTN:
        mask = None
        if case.causal:
            mask = flexattn.create_block_mask(_causal, None, None, case.q_len, case.kv_len, device=device)
        options = {**(options or {}), **FLEXATTN[impl]} or None
        return lambda: flexattn.flex_attention(q, k, v, block_mask=mask, kernel_options=options)
    from torch.nn.attention import flex_attention as torch_flex

    mask = None
    if case.causal:
        mask = torch_flex.create_block_mask(_causal, None, None, case.q_len, case.kv_len, device=device)
    fn = torch_flex.flex_attention
    if impl == "torch-compiled":
        fn = torch.compile(fn, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask)


def time_call(
    call: Callable, device: str, calls: int, warmup: int, repeats: int, clock: Callable = time.perf_counter
) -> dict[str, float]:
    """Median microseconds per call: host (the launch loop) and wall (loop plus final sync)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        call()
    sync()
    host, wall = [], []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            call()
        launched = clock()
        sync()
        done = clock()
        host.append((launched - start) / calls * 1e6)
        wall.append((done - start) / calls * 1e6)
    return {"host_us": statistics.median(host), "wall_sync_us": statistics.median(wall)}


def breakdown(call: Callable, calls: int, top: int, sort: str = "cumulative") -> str:
    """cProfile's ``top`` entries by ``sort`` (cumulative or tottime) over ``calls`` calls (after one
    warm call)."""
    call()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(sort).print_stats(top)
    return text.getvalue()


# ---- --simulate-launch: the GPU host path on CPU tensors ---------------------------------------


class _StubUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 64, 0, 1024  # module, function, registers, spills, max threads


class _StubDriver:
    """Triton's CUDA driver as far as compiling for sm_90a and a no-op launch need it."""

    utils = _StubUtils()

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def launcher_cls(self, src, metadata):
        return lambda *args: None


@contextlib.contextmanager
def simulated_gpu():
    """flexattn's Triton path for CPU tensors as on an H100, launching nothing (see the docstring).

    Steered only where flexattn asks its environment: the launchers' target (``device_limits``),
    the mod compiler's code target, and the backend choice (which would pick the reference)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--simulate-launch compiles real kernels: unset TRITON_INTERPRET.")
    import triton

    import flexattn.compiler as mod_compiler
    from flexattn import dispatch, plan
    from flexattn.kernels import decode, forward
    from flexattn.kernels.device import DeviceLimits

    hopper = DeviceLimits((9, 0), 232448, 132)  # an H100 / H200: compute capability, shared memory, SMs
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_StubDriver())
    try:
        with (
            mock.patch.object(forward, "device_limits", lambda device: hopper),
            mock.patch.object(decode, "device_limits", lambda device: hopper),
            mock.patch.object(plan, "device_limits", lambda device: hopper),
            mock.patch.object(mod_compiler, "_target", lambda device, program: "cuda"),
            mock.patch.object(dispatch, "choose_backend", lambda *args, **kwargs: "TRITON"),
        ):
            yield
    finally:
        driver._active = previous
        flexattn.call_cache.clear()  # (its entries repeat the stub driver's kernels)


RUNS_ON_CPU = True  # host time is measured on CPU as well (tests/test_cli.py)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float16 or bfloat16 on CUDA (default), float32 on CPU")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="100 calls, 2 repeats")
    parser.add_argument("--simulate-launch", action="store_true", help="flexattn only, see the docstring")
    parser.add_argument("--breakdown", metavar="CASE", choices=list(CASES), help="cProfile flexattn on CASE")
    parser.add_argument("--top", type=int, default=30, help="entries shown by --breakdown")
    parser.add_argument(
        "--sort", choices=("cumulative", "tottime"), default="cumulative", help="--breakdown order"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--clock", choices=("wall", "thread"), default="wall",
        help="thread: this thread's CPU time (a loaded shared machine; single-threaded paths only)",
    )  # fmt: skip
    args, _ = parser.parse_known_args(argv)  # `flexattn bench --quick` passes other benchmarks' options
    if args.quick:
        args.calls, args.warmup, args.repeats = 100, 10, 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.simulate_launch:
        args.impls, args.device = [i for i in args.impls if i in FLEXATTN], "cpu"
        args.dtype = args.dtype or "float16"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU (torch.cuda.is_available() is False).")
    context = simulated_gpu() if args.simulate_launch else contextlib.nullcontext()
    options = {"BACKEND": "TRITON"} if args.simulate_launch else None
    with context:
        if args.breakdown:
            call = make_call("flexattn", CASES[args.breakdown], args.device, args.dtype, options)
            print(breakdown(call, args.calls, args.top, args.sort))
            return 0
        rows = []
        for name in args.cases:
            case = CASES[name]
            for impl in args.impls:
                try:
                    call = make_call(impl, case, args.device, args.dtype, options)
                    clock = time.thread_time if args.clock == "thread" else time.perf_counter
                    times = time_call(call, args.device, args.calls, args.warmup, args.repeats, clock)
                    row = {"case": name, "impl": impl, **times}
                except Exception as err:  # an implementation that cannot run this case: say why
                    row = {"case": name, "impl": impl, "error": f"{type(err).__name__}: {err}"[:200]}
                rows.append(row)
    _print_table(rows, args)
    if args.json:
        meta = {"device": _device_name(args.device), "dtype": str(args.dtype), "torch": torch.__version__,
                "calls": args.calls, "repeats": args.repeats, "simulate_launch": args.simulate_launch,
                "clock": args.clock,
                "shapes": {n: asdict(CASES[n]) | {"B": B, "H": H, "E": E} for n in args.cases}}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    impls = [i for i in IMPLS if i in args.impls]
    mode = " (simulated launch)" if args.simulate_launch else ""
    print(f"host us per call ({args.clock} clock), {_device_name(args.device)}{mode}, {args.dtype}, "
          f"B{B} H{H} E{E}, median of {args.repeats} x {args.calls} calls (with the final sync in "
          "parentheses)")  # fmt: skip
    print(f"{'case':<8}" + "".join(f"{impl:>24}" for impl in impls))
    for name in args.cases:
        case = CASES[name]
        cells = []
        for impl in impls:
            row = next(r for r in rows if r["case"] == name and r["impl"] == impl)
            cell = "error" if "error" in row else f"{row['host_us']:.1f} ({row['wall_sync_us']:.1f})"
            cells.append(f"{cell:>24}")
        print(f"{name:<8}" + "".join(cells) + f"   Lq={case.q_len} Lkv={case.kv_len}")
    for row in rows:
        if "error" in row:
            print(f"  {row['impl']} on {row['case']}: {row['error']}")


if __name__ == "__main__":
    sys.exit(main())
