"""Attention benchmark: flexattn vs torch's compiled flex_attention vs SDPA, side by side in one process.

For the paper's seven variants (noop, causal, ALiBi, sliding window 1024, prefix LM L/4, document
mask with 12 random documents, tanh soft-cap 30) at B4 H16 L8192 E128 and B4 H16 L16384 E64 in bf16,
it times (median of ``triton.testing.do_bench``):

- ``flexattn``: ``flexattn.flex_attention`` with ``flexattn.create_block_mask`` (soft-cap via
  ``fast_tanh``, the compiler's hardware tanh);
- ``torch``: ``torch.nn.attention.flex_attention`` under ``torch.compile``, mask from torch's own
  ``create_block_mask`` on the GPU, the same mods;
- ``sdpa-flash`` / ``sdpa-cudnn``: ``F.scaled_dot_product_attention`` where SDPA can express the
  variant (noop; causal via ``is_causal``).

TFLOP/s = 4·B·H·Lq·Lkv·E·density / time (density = fraction of kv blocks visited; backward counts
2.5x the forward, so ``--backward`` (forward + backward) counts 3.5x). Masks are built once per
variant, outside the timings. The ratio column is flexattn / torch (higher is better).

Usage (CUDA machine)::

    python benchmarks/bench_attention.py              # forward, both configs (~4 minutes on an H100)
    python benchmarks/bench_attention.py --quick      # E128 config, 4 variants
    python benchmarks/bench_attention.py --backward   # forward + backward
    python benchmarks/bench_attention.py --write      # also refresh the table in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import flexattn
from flexattn import variants as V
from flexattn.compiler import fast_tanh

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    B: int
    H: int
    L: int
    E: int

    def __str__(self) -> str:
        return f"B{self.B} H{self.H} L{self.L} E{self.E}"


@dataclass
class Variant:
    """One attention variant: the same mods for every implementation (soft-cap: fast tanh in flexattn)."""

    name: str
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    flex_score_mod: Callable | None = None  # flexattn's score_mod when it differs (fast tanh)
    sdpa: dict | None = None  # SDPA kwargs when SDPA can express the variant
    flex_options: dict | None = None  # flexattn's kernel_options (deterministic mode)
    default: bool = True  # run without --variants (the learnable-bias rows are asked for by name)


CONFIGS = [Config(4, 16, 8192, 128), Config(4, 16, 16384, 64)]
QUICK_VARIANTS = ("noop", "causal", "document", "softcap")


def make_variants(cfg: Config, device: str) -> list[Variant]:
    doc_lengths = torch.full((12,), cfg.L // 12)
    doc_lengths[: cfg.L - int(doc_lengths.sum())] += 1
    doc_lengths = doc_lengths[torch.randperm(12)] + torch.randint(-cfg.L // 48, cfg.L // 48, (12,))
    doc_lengths[-1] = cfg.L - int(doc_lengths[:-1].sum())
    doc_ids = V.document_ids_from_lengths(doc_lengths).to(device)

    def softcap_fast(score, b, h, q_idx, kv_idx):
        return 30.0 * fast_tanh(score / 30.0)

    return [
        Variant("noop", sdpa={}),
        Variant("causal", mask_mod=V.causal(), sdpa={"is_causal": True}),
        Variant("alibi", score_mod=V.alibi(cfg.H, device=device)),
        Variant("sliding_window_1024", mask_mod=V.sliding_window(1024)),
        Variant("prefix_lm", mask_mod=V.prefix_lm(cfg.L // 4)),
        Variant("document", mask_mod=V.document_mask(doc_ids)),
        Variant("softcap", score_mod=V.tanh_softcap(30.0), flex_score_mod=softcap_fast),
        *learnable_variants(cfg, device),
    ]


def learnable_variants(cfg: Config, device: str) -> list[Variant]:
    """Learnable biases (issue #14): a relative-position table (H, 2L - 1) and a per-head bias, their
    gradients accumulated by the backward; the table also in deterministic mode. Opt-in by name."""
    table = (0.1 * torch.randn(cfg.H, 2 * cfg.L - 1, device=device)).requires_grad_()
    head_bias = torch.randn(cfg.H, device=device).requires_grad_()

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + cfg.L - 1]

    def per_head_bias(score, b, h, q_idx, kv_idx):
        return score + head_bias[h]

    return [
        Variant("rel_bias_learned", score_mod=relative_bias, default=False),
        Variant(
            "rel_bias_learned_det",
            score_mod=relative_bias,
            flex_options={"deterministic": True},
            default=False,
        ),
        Variant("head_bias_learned", score_mod=per_head_bias, default=False),
    ]


def bench_ms(fn: Callable[[], object], quick: bool) -> float:
    """Median ms of ``fn`` after a 200 ms warm-up, the same for every implementation, so none is
    timed on a GPU that has just idled through seconds of compiling."""
    return triton.testing.do_bench(
        fn, warmup=50 if quick else 200, rep=40 if quick else 100, return_mode="median"
    )


def density(mask: flexattn.BlockMask) -> float:
    visited = mask.kv_num_blocks.sum() + (
        0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum()
    )
    return float(visited) / (mask.kv_num_blocks.numel() * mask.kv_indices.shape[-1])


def timed(call: Callable, q, k, v, backward: bool) -> Callable[[], object]:
    """A closure running the forward (no grad) or forward + backward of ``call(q, k, v)``."""
    if not backward:

        def forward():
            with torch.no_grad():
                return call(q, k, v)

        return forward
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def forward_backward():
        out = call(qg, kg, vg)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dout)

    return forward_backward


def implementations(var: Variant, fmask, tmask, torch_flex_compiled) -> dict[str, Callable]:
    """``name -> call(q, k, v)`` for every implementation that can express ``var``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flex_score = var.flex_score_mod or var.score_mod

    def ours(q, k, v):
        return flexattn.flex_attention(
            q, k, v, score_mod=flex_score, block_mask=fmask, kernel_options=var.flex_options
        )

    def torch_flex(q, k, v):
        return torch_flex_compiled(q, k, v, score_mod=var.score_mod, block_mask=tmask)

    impls = {"flexattn": ours, "torch": torch_flex}
    if var.sdpa is not None:
        for label, backend in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, **var.sdpa)

            impls[label] = sdpa
    return impls


def run(args) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask as torch_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per variant
    torch._dynamo.config.recompile_limit = 64
    torch_flex_compiled = torch.compile(torch_flex, dynamic=False)
    device = "cuda"
    torch.manual_seed(0)
    rows = []
    configs = [cfg for cfg in CONFIGS if not args.head_dims or cfg.E in args.head_dims]
    configs = configs[:1] if args.quick else configs
    for cfg in configs:
        q, k, v = (
            torch.randn(cfg.B, cfg.H, cfg.L, cfg.E, device=device, dtype=torch.bfloat16) for _ in range(3)
        )
        for var in make_variants(cfg, device):
            if (args.variants and var.name not in args.variants) or (not args.variants and not var.default):
                continue
            if args.quick and var.name not in QUICK_VARIANTS:
                continue
            try:
                row = measure(cfg, var, q, k, v, torch_block_mask, torch_flex_compiled, args)
            except Exception as err:  # keep going: one broken variant must not hide the others
                print(f"{cfg} {var.name}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            rows.append(row)
            print(format_row(row), flush=True)
            if args.json:  # after every row, so a run cut short still leaves its numbers
                args.json.write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
        torch._dynamo.reset()
    return rows


def measure(cfg: Config, var: Variant, q, k, v, torch_block_mask, torch_flex_compiled, args) -> dict:
    """One row: masks built once, a correctness check against torch, then every implementation timed.

    Each implementation gets ``fwd_ms`` / ``fwd_tflops``; with ``--backward`` also ``fwdbwd_ms`` and
    ``bwd_tflops`` (the backward alone: (forward + backward) - forward, at 2.5x the forward FLOPs).
    """
    device = q.device
    started = time.time()
    mask_mod = var.mask_mod or flexattn.noop_mask
    fmask = flexattn.create_block_mask(mask_mod, None, None, cfg.L, cfg.L, device=device)
    tmask = torch_block_mask(mask_mod, None, None, cfg.L, cfg.L, device=device)
    dens = density(fmask)
    fwd_flops = 4 * cfg.B * cfg.H * cfg.L * cfg.L * cfg.E * dens
    impls = implementations(var, fmask, tmask, torch_flex_compiled)
    with torch.no_grad():
        ours = impls["flexattn"](q, k, v)
        theirs = impls["torch"](q, k, v)
    rel = float((ours.float() - theirs.float()).norm() / theirs.float().norm())
    row = {"config": str(cfg), "variant": var.name, "density": dens, "rel_diff_vs_torch": rel}
    for label, call in impls.items():
        try:
            fwd_ms = bench_ms(timed(call, q, k, v, False), args.quick)
            row[label] = {"fwd_ms": fwd_ms, "fwd_tflops": fwd_flops / fwd_ms / 1e9}
            if args.backward:
                both_ms = bench_ms(timed(call, q, k, v, True), args.quick)
                row[label]["fwdbwd_ms"] = both_ms
                row[label]["bwd_tflops"] = 2.5 * fwd_flops / (both_ms - fwd_ms) / 1e9
        except RuntimeError as err:  # e.g. an SDPA backend not available for this shape
            row[label] = {"error": str(err).splitlines()[0][:80]}
    for key, ratio in (("fwd_tflops", "ratio"), ("bwd_tflops", "bwd_ratio")):
        if key in row["torch"] and key in row["flexattn"]:
            row[ratio] = row["flexattn"][key] / row["torch"][key]
    row["seconds"] = time.time() - started
    return row


IMPLS = ("flexattn", "torch", "sdpa-flash", "sdpa-cudnn")


def format_row(row: dict) -> str:
    cells = [f"{row['config']:20s}", f"{row['variant']:20s}", f"dens {row['density']:.3f}"]
    for label in IMPLS:
        r = row.get(label)
        if r is None:
            cells.append(f"{label} -")
        elif "fwd_ms" in r:
            bwd = f" bwd {r['bwd_tflops']:.0f} TF" if "bwd_tflops" in r else ""
            cells.append(f"{label} {r['fwd_ms']:.2f} ms {r['fwd_tflops']:.0f} TF{bwd}")
        else:
            cells.append(f"{label} n/a")
    cells.append(f"ratio {row.get('ratio', float('nan')):.2f}x")
    if "bwd_ratio" in row:
        cells.append(f"bwd ratio {row['bwd_ratio']:.2f}x")
    cells.append(f"diff {row['rel_diff_vs_torch']:.1e}")
    return " | ".join(cells)


def markdown_table(rows: list[dict]) -> str:
    """The forward table, and the backward table when the rows carry backward timings."""

    def tf(row, label, key):
        r = row.get(label)
        return f"{r[key]:.0f}" if r and key in r else "–"

    lines = [
        "Forward, TFLOP/s (flexattn/torch > 1 means flexattn is faster):",
        "",
        "| config | variant | density | flexattn ms | flexattn | torch (compiled) | flexattn/torch "
        "| SDPA flash | SDPA cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row["flexattn"].get("fwd_ms")
        lines.append(
            f"| {row['config']} | {row['variant']} | {row['density']:.3f} | "
            f"{'–' if ms is None else f'{ms:.2f}'} | {tf(row, 'flexattn', 'fwd_tflops')} | "
            f"{tf(row, 'torch', 'fwd_tflops')} | {row.get('ratio', float('nan')):.2f}x | "
            f"{tf(row, 'sdpa-flash', 'fwd_tflops')} | {tf(row, 'sdpa-cudnn', 'fwd_tflops')} |"
        )
    if any("bwd_ratio" in row for row in rows):
        lines += [
            "",
            "Backward alone ((forward + backward) - forward), TFLOP/s at 2.5x the forward FLOPs:",
            "",
            "| config | variant | flexattn | torch (compiled) | flexattn/torch | SDPA flash | SDPA cuDNN |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row['config']} | {row['variant']} | {tf(row, 'flexattn', 'bwd_tflops')} | "
                f"{tf(row, 'torch', 'bwd_tflops')} | {row.get('bwd_ratio', float('nan')):.2f}x | "
                f"{tf(row, 'sdpa-flash', 'bwd_tflops')} | {tf(row, 'sdpa-cudnn', 'bwd_tflops')} |"
            )
    return "\n".join(lines)


def environment() -> dict:
    """Card, versions, date and command of this run (stored with the rows)."""
    return {
        "card": torch.cuda.get_device_name(),
        "versions": f"torch {torch.__version__}; triton {triton.__version__}; "
        f"flexattn {flexattn.__version__}",
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "command": ("python benchmarks/bench_attention.py " + " ".join(sys.argv[1:])).strip(),
    }


def write_markdown(rows: list[dict], env: dict) -> None:
    """Refresh the results section of BENCHMARKS.md (between its markers), leaving the rest alone."""
    mode = "results"
    section = "\n".join(
        [
            f"<!-- bench:{mode}:start -->",
            "### Results (bf16)",
            "",
            f"- card: {env['card']}; {env['versions']}",
            f"- date: {env['date']}",
            f"- command: `{env['command']}`",
            "",
            markdown_table(rows),
            f"<!-- bench:{mode}:end -->",
        ]
    )
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{mode}:start -->.*?<!-- bench:{mode}:end -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section + "\n"
    )
    path.write_text(text)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="E128 config, 4 variants, fewer repetitions")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--write", action="store_true", help="refresh the table in BENCHMARKS.md")
    parser.add_argument("--variants", nargs="*", help="only these variants (names as printed)")
    parser.add_argument("--head-dims", type=int, nargs="*", help="only the configs with these head dims")
    parser.add_argument("--json", type=Path, help="also dump the rows as JSON here (after every row)")
    parser.add_argument("--from-json", type=Path, help="no GPU run: print/--write the rows of a saved JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        env, rows = saved["env"], saved["rows"]
    elif not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU.")
    else:
        rows, env = run(args), environment()
    print()
    print(markdown_table(rows))
    if args.write:
        write_markdown(rows, env)


if __name__ == "__main__":
    main()
