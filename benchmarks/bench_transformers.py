"""Hugging Face transformers models on flexattn, torch's flex_attention and SDPA, side by side (issue #15).

Each model (random weights, bf16 on CUDA) runs through transformers' own attention paths:

- ``flexattn``: ``attn_implementation="flex_attention"`` after
  :func:`flexattn.integrations.transformers.use_flexattn` (transformers compiles flex_attention);
- ``torch-flex``: the same path with PyTorch's functions (:func:`use_pytorch`);
- ``sdpa``: ``attn_implementation="sdpa"`` (``"eager"`` for a model without an SDPA path, said in
  its row).

Measured per (model, implementation), in one process:

- ``train``: a forward + backward step of the causal-LM loss on a (B, L) batch (left-padded when
  ``--padded``), tokens/s = B * L / step time (median of ``--steps`` after ``--warmup``);
- ``generate``: ``model.generate`` greedy with the dynamic cache from B prompts of ``--prompt`` tokens,
  ``--new-tokens`` new tokens; tokens/s counts the new tokens only (after one warm-up generation).

The first call of each flex implementation compiles (transformers wraps flex_attention in
torch.compile); that time is reported separately as ``first``. Before timing, the logits of the
first batch are compared with SDPA's (max |diff| of the logits, bf16).

    python benchmarks/bench_transformers.py --json hf.json                 # CUDA, the default sizes
    python benchmarks/bench_transformers.py --models llama --impls flexattn sdpa
    python benchmarks/bench_transformers.py --tiny --device cpu            # tiny models on CPU (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

import flexattn.integrations.transformers as hf

IMPLS = ("flexattn", "torch-flex", "sdpa")
MODELS = ("llama", "qwen2", "gemma2", "mistral")


@dataclass
class Row:
    model: str
    impl: str
    attn: str  # the attn_implementation transformers ran
    first_s: float  # the first forward + backward (compiles)
    train_tok_s: float | None
    generate_tok_s: float | None
    max_logit_diff: float | None  # against SDPA's logits on the same batch
    error: str | None = None


def _config(kind: str, tiny: bool):
    import transformers

    if tiny:
        size = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=256)  # fmt: skip
    else:
        size = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                    max_position_embeddings=8192)  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(**size)
    if kind == "mistral":
        return transformers.MistralConfig(**size, sliding_window=None)
    window = 16 if tiny else 1024
    if kind == "qwen2":
        layers = ["sliding_attention", "full_attention"] * (size["num_hidden_layers"] // 2)
        return transformers.Qwen2Config(**size, use_sliding_window=True, sliding_window=window,
                                        max_window_layers=1, layer_types=layers)  # fmt: skip
    if kind == "gemma2":  # soft-capped scores, sliding and full layers
        return transformers.Gemma2Config(**size, sliding_window=window, attn_logit_softcapping=50.0,
                                         query_pre_attn_scalar=size["head_dim"])  # fmt: skip
    raise ValueError(f"model {kind!r}: choose from {MODELS}")


def _batch(args, vocab: int, device):
    ids = torch.randint(0, vocab, (args.batch, args.length), device=device)
    mask = torch.ones_like(ids)
    if args.padded:  # left padding, not a multiple of the block size
        for row in range(1, args.batch):
            mask[row, : (37 * row) % args.length] = 0
    return ids, mask


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _bind(impl: str) -> str:
    if impl == "flexattn":
        hf.use_flexattn()
    else:
        hf.use_pytorch()
    torch._dynamo.reset()  # each implementation compiles its own graphs
    return "sdpa" if impl == "sdpa" else "flex_attention"


def run_one(kind: str, impl: str, args, state: dict, device, dtype) -> Row:
    import transformers

    attn = _bind(impl)
    config = _config(kind, args.tiny)
    torch.manual_seed(0)  # the same weights for every implementation
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError as error:  # a model without an SDPA path (Gemma2 in transformers 5) runs eager
        if attn != "sdpa" or "does not support" not in str(error):
            raise
        attn = "eager"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.to(device=device, dtype=dtype)
    ids, mask = state.setdefault("batch", _batch(args, config.vocab_size, device))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.logits

    first = _timed(step, device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    diff = None
    if impl == "sdpa":
        state[("logits", kind)] = logits[keep]
    elif ("logits", kind) in state:
        diff = (logits[keep] - state[("logits", kind)]).abs().max().item()
    for _ in range(args.warmup):
        step()
    times = [_timed(step, device) for _ in range(args.steps)]
    train = args.batch * args.length / statistics.median(times)

    generate = None
    if args.new_tokens:
        prompt, prompt_mask = ids[:, : args.prompt], mask[:, : args.prompt]

        def gen():
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)  # fmt: skip

        gen()  # warm-up (compiles the decode shapes)
        generate = args.batch * args.new_tokens / _timed(gen, device)
    return Row(kind, impl, attn, first, train, generate, diff)


def _table(rows: list[Row]) -> str:
    lines = ["| model | impl | first step s | train tok/s | vs torch-flex | vs sdpa | generate tok/s | "
             "vs torch-flex | vs sdpa | max logit diff vs sdpa |", "|" + "---|" * 10]  # fmt: skip
    by = {(r.model, r.impl): r for r in rows}

    def ratio(row, other, field):
        base = by.get((row.model, other))
        a, b = getattr(row, field), getattr(base, field, None) if base else None
        return f"{a / b:.2f}x" if a and b else "-"

    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.impl} | failed: {r.error} |" + " |" * 7)
            continue
        impl = r.impl if r.attn in ("sdpa", "flex_attention") else f"{r.impl} (ran {r.attn})"
        gen = f"{r.generate_tok_s:,.0f}" if r.generate_tok_s else "-"
        diff = f"{r.max_logit_diff:.3g}" if r.max_logit_diff is not None else "-"
        lines.append(
            f"| {r.model} | {impl} | {r.first_s:.1f} | {r.train_tok_s:,.0f} "
            f"| {ratio(r, 'torch-flex', 'train_tok_s')} "
            f"| {ratio(r, 'sdpa', 'train_tok_s')} | {gen} | {ratio(r, 'torch-flex', 'generate_tok_s')} "
            f"| {ratio(r, 'sdpa', 'generate_tok_s')} | {diff} |"
        )
    return "\n".join(lines)


RUNS_ON_CPU = True  # --tiny models run on CPU too (tests/test_cli.py)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--padded", action="store_true", help="left-pad rows 1.. of the batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens of the generation run")
    parser.add_argument("--new-tokens", type=int, default=64, help="0 skips generation")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="Llama only, 3 steps, 8 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.warmup, args.new_tokens = ["llama"], 3, 1, min(args.new_tokens, 8)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda needs a GPU (torch.cuda.is_available() is False); use --tiny --device cpu"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.length, args.prompt = min(args.length, 64), min(args.prompt, 16)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = sorted(args.impls, key=lambda name: name != "sdpa")  # SDPA first: the logits to check against
    rows, state = [], {}
    for kind in args.models:
        for impl in impls:
            try:
                row = run_one(kind, impl, args, state, device, dtype)
            except Exception as error:  # a failing implementation is a row, the others still run
                message = f"{type(error).__name__}: {error}"[:160]
                row = Row(kind, impl, "-", 0.0, None, None, None, error=message)
            rows.append(row)
            print(f"{kind} {impl}: {asdict(row)}", flush=True)
        state.pop("batch", None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    padded = " padded" if args.padded else ""
    print(f"\n{name}, torch {torch.__version__}, B{args.batch} L{args.length}{padded}, {dtype}\n")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
