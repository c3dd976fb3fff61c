"""Per-kernel GPU times of one forward + backward step, flexattn next to torch's flex_attention.

The profiler evidence behind the analysis in BENCHMARKS.md: which kernel (forward, backward
preprocess, dK/dV, dQ, mask building, copies) takes the time, for the paper's configurations.

    python benchmarks/bench_profile.py                       # E128 noop and document
    python benchmarks/bench_profile.py --cases E64:noop E128:causal
    flexattn bench profile                                   # the same through the command

Options meant for the other benchmarks (``flexattn bench --quick``) are ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import CONFIGS, make_variants  # noqa: E402

import flexattn  # noqa: E402

STEPS = 5


def kernel_times(step) -> dict[str, float]:
    """Mean GPU milliseconds per step for every kernel name ``step()`` launches."""
    for _ in range(3):
        step()  # compile and warm up outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key[:70]] += event.device_time_total / 1e3 / STEPS
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def step_for(attention, q, k, v, score_mod, block_mask):
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def step():
        out = attention(qg, kg, vg, score_mod=score_mod, block_mask=block_mask)
        out.backward(dout)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=["E128:noop", "E128:document"])
    args, _ = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_profile.py needs a CUDA GPU.")
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    torch_flex_compiled = torch.compile(torch_flex, dynamic=False)
    for case in args.cases:
        e, name = case.split(":")
        cfg = next(c for c in CONFIGS if f"E{c.E}" == e)
        var = next(v for v in make_variants(cfg, "cuda") if v.name == name)
        mask_mod = var.mask_mod or flexattn.noop_mask
        q, k, v = (
            torch.randn(cfg.B, cfg.H, cfg.L, cfg.E, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        ours = flexattn.create_block_mask(mask_mod, None, None, cfg.L, cfg.L, device="cuda")
        theirs = torch_block_mask(mask_mod, None, None, cfg.L, cfg.L, device="cuda")
        for label, attention, mask, score in (
            ("flexattn", flexattn.flex_attention, ours, var.flex_score_mod or var.score_mod),
            ("torch", torch_flex_compiled, theirs, var.score_mod),
        ):
            times = kernel_times(step_for(attention, q, k, v, score, mask))
            print(f"{cfg} {name} {label}: {sum(times.values()):.2f} ms per forward+backward step")
            for kernel, ms in times.items():
                print(f"    {ms:8.3f} ms  {kernel}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
