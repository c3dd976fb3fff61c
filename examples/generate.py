"""Greedy generation with a small Llama-style model: flexattn's paged KV cache vs SDPA vs torch's flex.

A batch of prompts of mixed lengths (random, seeded) is prefilled, then ``--new-tokens`` tokens per
sequence are generated greedily, with each attention implementation of ``kv_caches.py`` in turn,
on the same random weights (``llama_decoder.py``: GQA, RoPE, RMSNorm, SwiGLU):

- ``flexattn``: flexattn's paged KV cache; prefill packs the prompts into one row (a causal block
  mask within each prompt, no padding), decode reads the pages through the page table;
- ``flexattn-dense``: the same prefill, dense caches, decode through ``Positions`` (decode kernel);
- ``sdpa``: ``F.scaled_dot_product_attention`` on dense, padded, preallocated caches;
- ``torch-flex``: PyTorch's ``flex_attention`` (compiled on CUDA) with PyTorch's PagedAttention.

Each runs in every ``--modes``: ``eager``; ``graph`` (CUDA: each decode step one CUDA graph replay);
``static`` (the step the graph captures, run eagerly: its device-only code path, on any device). A
run is timed after a short warm-up run (compilation, graph capture). Reported per run: prefill
tokens/s (prompt tokens / prefill time), decode tokens/s (B tokens per step), overall
(generated tokens / total time), peak GPU memory (``torch.cuda.max_memory_allocated``, weights
included) and the KV cache's size, and agreement with the reference run (``sdpa`` eager, else the
first): tokens identical from the start (per sequence, summed) and the largest logit difference at
the first token (prefill) and at the first decode step. In fp32 every run must generate exactly
the reference's tokens (``--check``, on by default for fp32); in bf16 they may drift apart after
near-ties, so the agreement is reported, not asserted.

    python examples/generate.py --json generate.json                   # CUDA: the H200-sized model
    python examples/generate.py --impl flexattn sdpa --modes graph --new-tokens 256
    python examples/generate.py --device cpu                          # a tiny model in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_caches import IMPLEMENTATIONS, MODES, FlexattnPaged, KVCache, PackedFlexattn, TorchFlexPaged  # noqa: E402
from llama_decoder import Config, Decoder  # noqa: E402

CPU_CONFIG = Config(vocab_size=256, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WARMUP_TOKENS = 3  # the warm-up run: every shape the timed run meets (prefill, decode), fewer steps


@dataclass
class Generation:
    tokens: torch.Tensor  # int64 (B, new_tokens), CPU
    prefill_logits: torch.Tensor  # fp32 (B, vocab): of each prompt's last token
    step_logits: torch.Tensor | None  # fp32 (B, vocab): of the first decode step
    prefill_s: float
    decode_s: float


@dataclass
class Row:
    impl: str
    mode: str
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    overall_tok_s: float | None = None
    prefill_ms: float | None = None
    decode_ms_per_step: float | None = None
    peak_gb: float | None = None
    kv_cache_gb: float | None = None
    agree: int | None = None  # tokens equal to the reference's, from the start of each sequence
    total: int | None = None
    prefill_logit_diff: float | None = None
    step_logit_diff: float | None = None
    error: str | None = None
    tokens: list[list[int]] = field(default_factory=list, repr=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(model: Decoder, cache: KVCache, prompts: list[torch.Tensor], new_tokens: int) -> Generation:
    """Prefill the prompts, then pick ``new_tokens`` tokens per sequence greedily (the first from
    the prefill's logits)."""
    device = cache.device
    cache.start()
    sync(device)
    t0 = time.perf_counter()
    logits = cache.prefill(model, prompts)  # (B, vocab)
    prefill_logits = logits.clone()
    token = logits.argmax(-1)  # (B,)
    picked = [token]
    sync(device)
    t1 = time.perf_counter()
    step_logits = None
    for step in range(new_tokens - 1):
        logits = cache.decode(model, token)
        if step == 0:
            step_logits = logits.clone()
        token = logits.argmax(-1)
        picked.append(token)
    sync(device)
    t2 = time.perf_counter()
    step_logits = None if step_logits is None else step_logits.cpu()
    return Generation(torch.stack(picked, dim=1).cpu(), prefill_logits.cpu(), step_logits, t1 - t0, t2 - t1)


def make_cache(name: str, mode: str, cfg: Config, lengths, args, device, dtype) -> KVCache:
    kind = IMPLEMENTATIONS[name]
    kwargs = {}
    if issubclass(kind, PackedFlexattn):
        options = {} if args.flexattn_backend == "auto" else {"BACKEND": args.flexattn_backend.upper()}
        if args.prefill_kernel:
            options["PREFILL_KERNEL"] = args.prefill_kernel
        kwargs["kernel_options"] = options or None
    if issubclass(kind, (FlexattnPaged, TorchFlexPaged)):
        kwargs["page_size"] = args.page_size
    if kind is TorchFlexPaged:
        kwargs["compiled"] = args.torch_compile
    return kind(cfg, lengths, args.new_tokens, device, dtype, mode, **kwargs)


def run(name: str, mode: str, model: Decoder, prompts, args, device, dtype) -> tuple[Row, Generation | None]:
    """Build the implementation's caches, warm up, then time one generation."""
    label = f"{name} ({'compiled' if args.torch_compile else 'eager'})" if name == "torch-flex" else name
    row = Row(label, mode)
    lengths = [len(p) for p in prompts]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        cache = make_cache(name, mode, model.cfg, lengths, args, device, dtype)
        generate(model, cache, prompts, min(WARMUP_TOKENS, args.new_tokens))
        gen = generate(model, cache, prompts, args.new_tokens)
    except Exception as err:  # report the run and go on with the others
        row.error = f"{type(err).__name__}: {err}"[:400]
        return row, None
    B, steps = len(prompts), args.new_tokens - 1
    row.prefill_tok_s = sum(lengths) / gen.prefill_s
    row.decode_tok_s = B * steps / gen.decode_s if steps else None
    row.overall_tok_s = B * args.new_tokens / (gen.prefill_s + gen.decode_s)
    row.prefill_ms = gen.prefill_s * 1e3
    row.decode_ms_per_step = gen.decode_s * 1e3 / steps if steps else None
    row.peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row.kv_cache_gb = cache.cache_bytes / 2**30
    row.tokens = gen.tokens.tolist()
    del cache
    return row, gen


def compare(row: Row, gen: Generation, ref: Generation) -> None:
    """Fill the row's agreement with the reference generation."""
    same = (gen.tokens == ref.tokens).long().cumprod(dim=1)  # 1 until the first difference
    row.agree, row.total = int(same.sum()), gen.tokens.numel()
    row.prefill_logit_diff = (gen.prefill_logits - ref.prefill_logits).abs().max().item()
    if gen.step_logits is not None:
        row.step_logit_diff = (gen.step_logits - ref.step_logits).abs().max().item()


def table(rows: list[Row]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "| impl | mode | prefill tok/s | decode tok/s | overall tok/s | prefill ms | decode ms/step "
        "| peak GB | KV cache GB | tokens = reference | max logit diff (prefill, step 1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.impl} | {r.mode} | error: {r.error} | | | | | | | | |")
            continue
        agree = "-" if r.agree is None else f"{r.agree}/{r.total}"
        lines.append(
            f"| {r.impl} | {r.mode} | {fmt(r.prefill_tok_s, ',.0f')} | {fmt(r.decode_tok_s, ',.0f')} "
            f"| {fmt(r.overall_tok_s, ',.0f')} | {fmt(r.prefill_ms, '.1f')} "
            f"| {fmt(r.decode_ms_per_step, '.2f')} | {fmt(r.peak_gb, '.2f')} | {fmt(r.kv_cache_gb, '.3f')} "
            f"| {agree} "
            f"| {fmt(r.prefill_logit_diff, '.2e')}, {fmt(r.step_logit_diff, '.2e')} |"
        )
    return "\n".join(lines)


def speedups(rows: list[Row]) -> list[str]:
    """Per mode, flexattn's tokens/s (overall and decode) over each other implementation's."""
    lines = []
    for mode in dict.fromkeys(r.mode for r in rows):
        ok = {r.impl: r for r in rows if r.mode == mode and not r.error}
        ours = ok.get("flexattn")
        others = [r for name, r in ok.items() if name != "flexattn"]
        if ours is None or not others:
            continue
        parts = []
        for what in ("overall_tok_s", "decode_tok_s"):
            vs = [
                f"{getattr(ours, what) / getattr(r, what):.2f}x {r.impl}" for r in others if getattr(r, what)
            ]
            if getattr(ours, what) and vs:
                parts.append(f"{what.split('_')[0]} {', '.join(vs)}")
        lines.append(f"{mode}: flexattn tokens/s = " + "; ".join(parts))
    return lines


def prompt_lengths(text: str, batch: int | None, seed: int) -> list[int]:
    """``"MIN-MAX"``: ``batch`` lengths uniform in [MIN, MAX] (seeded); ``"A,B,C"``: these lengths."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            if not 1 <= lo <= hi:
                raise ValueError
            gen = torch.Generator().manual_seed(seed)
            return torch.randint(lo, hi + 1, (batch,), generator=gen, device="cpu").tolist()
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(
            f"--prompt-lengths: expected MIN-MAX (1 <= MIN <= MAX) or A,B,C, got {text!r}"
        ) from None
    if min(lengths) < 1 or (batch is not None and batch != len(lengths)):
        raise SystemExit(f"--prompt-lengths {text!r}: {len(lengths)} lengths >= 1 for --batch {batch}")
    return lengths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, help="sequences (default: 16 on CUDA, 3 on CPU)")
    parser.add_argument(
        "--prompt-lengths", help="MIN-MAX (random, --seed) or A,B,C (default: 128-2048; CPU 5-40)"
    )
    parser.add_argument("--new-tokens", type=int, help="tokens generated per sequence (default: 128; CPU 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dim", type=int, help="residual width (head dim = dim / heads)")
    parser.add_argument("--heads", type=int, help="query heads")
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--ffn-dim", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    modes_help = "decode modes (default: eager graph on CUDA, eager static on CPU)"
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help=modes_help)
    parser.add_argument("--page-size", type=int, help="paged caches' page (default 64; CPU 16)")
    parser.add_argument("--flexattn-backend", choices=["auto", "triton", "reference"], default="auto")
    parser.add_argument(
        "--prefill-kernel",
        choices=["TRITON", "GLUON", "AUTO"],
        help="flexattn's kernel_options PREFILL_KERNEL (default: flexattn's choice)",
    )
    compile_help = "torch.compile PyTorch's flex_attention (default: on CUDA only)"
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, help=compile_help)
    check_help = "fail unless every run's tokens equal the reference's (default: on in fp32)"
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, help=check_help)
    parser.add_argument("--json", help="write the rows and the setup as JSON to this file")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    defaults = dict(
        dtype="bf16" if on_cuda else "fp32", batch=16 if on_cuda else 3, new_tokens=128 if on_cuda else 4,
        modes=["eager", "graph"] if on_cuda else ["eager", "static"], page_size=64 if on_cuda else 16,
        torch_compile=on_cuda,
    )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 1:
        raise SystemExit(f"--new-tokens must be >= 1, got {args.new_tokens}")
    args.lengths = prompt_lengths(
        args.prompt_lengths or ("128-2048" if on_cuda else "5-40"), args.batch, args.seed
    )
    args.batch = len(args.lengths)
    if args.check is None:
        args.check = args.dtype == "fp32"
    return args


def model_config(args: argparse.Namespace) -> Config:
    base = Config() if torch.device(args.device).type == "cuda" else CPU_CONFIG
    sizes = {"n_layers": args.layers, "dim": args.dim, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
             "ffn_dim": args.ffn_dim, "vocab_size": args.vocab}  # fmt: skip
    return replace(base, **{k: v for k, v in sizes.items() if v is not None})


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Decoder(cfg).to(dtype).eval()
    data = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=data, device="cpu") for n in args.lengths]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{card}, torch {torch.__version__} | Llama {cfg.n_layers} layers, dim {cfg.dim}, "
        f"{cfg.n_heads}/{cfg.n_kv_heads} heads of {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, "
        f"{args.dtype} | "
        f"B{args.batch}, prompts {min(args.lengths)}-{max(args.lengths)} (sum {sum(args.lengths)}), "
        f"{args.new_tokens} new tokens, page {args.page_size}",
        flush=True,
    )
    rows, gens = [], {}
    with torch.no_grad():
        for name in args.impl:
            for mode in args.modes:
                row, gen = run(name, mode, model, prompts, args, device, dtype)
                rows.append(row)
                gens[id(row)] = gen
                print(table([row]).splitlines()[-1], flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    done = [r for r in rows if gens[id(r)] is not None]
    ref = next((r for r in done if r.impl == "sdpa" and r.mode == "eager"), done[0] if done else None)
    for r in done:
        compare(r, gens[id(r)], gens[id(ref)])
    print(f"\nreference: {ref.impl} {ref.mode}" if ref else "\nno run finished")
    print(table(rows))
    for line in speedups(rows):
        print(line)
    if args.json:
        setup = {
            "config": asdict(cfg),
            **{k: v for k, v in vars(args).items() if k != "json"},
            "device_name": card,
        }
        with open(args.json, "w") as f:
            json.dump(
                {"setup": setup, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1
            )
    if args.check:
        wrong = [f"{r.impl} {r.mode}" for r in done if r.agree != r.total]
        if wrong:
            raise SystemExit(f"--check: {', '.join(wrong)} generated other tokens than {ref.impl} {ref.mode}")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row.error for row in main()) else 0)
