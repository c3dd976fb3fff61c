"""Train the packed-document GPT with each sequence sharded across ranks (context parallelism).

The model, data and document-causal BlockMask come from ``train_gpt_packed.py`` (imported, not
copied). Every rank builds the same batch and the same global BlockMask, plans the shards
(``plan_shards``: zigzag, balanced or contiguous), keeps its own tokens and runs the model on them;
attention is ``ring_flex_attention`` (K/V travel around the ring; blocks no local query sees are
skipped). The loss is the global token mean (each rank's sum, all-reduced) and the parameter gradients
are all-reduced, so every rank takes the step a single device would take:

    torchrun --nproc-per-node 8 examples/train_gpt_packed_cp.py                 # CUDA + NCCL
    torchrun --nproc-per-node 2 examples/train_gpt_packed_cp.py --device cpu --steps 5   # CPU + gloo
    python examples/train_gpt_packed_cp.py --device cpu --single-device --steps 5  # the same, one device

The launcher keeps ``NCCL_NVLS_ENABLE=0`` (NVLink SHARP multicast off).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpt_packed import CPU_CONFIG, GPT, Config, _doc_starts, document_causal_block_mask, packed_batch  # noqa: E402

from flexattn import flex_attention  # noqa: E402
from flexattn.distributed import plan_shards, ring_flex_attention, shard_block_mask, shard_sequence  # noqa: E402

CPU_BLOCK = 64  # the CPU config's 512 tokens: 8 blocks, enough chunks for zigzag on up to 4 ranks


def train(
    cfg: Config,
    device: torch.device,
    *,
    context_parallel: bool = True,
    strategy: str = "zigzag",
    schedule: str = "ring",
    block: int = 128,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Train ``cfg.steps`` steps; returns the global loss of each step (the same on every rank).

    ``context_parallel=False`` trains on one device with plain ``flex_attention`` (no process group).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if context_parallel else (0, 1)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    data = torch.Generator().manual_seed(seed + 1)  # the same batches on every rank
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        tokens, doc_ids = packed_batch(cfg, data)
        tokens, doc_ids = tokens.to(device), doc_ids.to(device)
        inputs, targets, ids = tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1]  # (B, L)
        positions = torch.arange(cfg.seq_len, device=device) - _doc_starts(ids)
        block_mask = document_causal_block_mask(ids, block)
        if context_parallel:
            plan = plan_shards(block_mask, world, strategy)
            sharded = shard_block_mask(block_mask, plan, rank)
            inputs, targets, positions = (
                shard_sequence(t, plan, rank, dim=1) for t in (inputs, targets, positions)
            )

            attend = functools.partial(
                ring_flex_attention, sharded_mask=sharded, schedule=schedule
            )  # on (B, H, L_r, E)
        else:
            attend = functools.partial(flex_attention, block_mask=block_mask)
        with autocast:
            logits = model(inputs, positions, attend)  # (B, L_r, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        loss = loss / (cfg.batch_size * cfg.seq_len)  # this rank's share of the global mean
        loss.backward()
        loss = loss.detach()
        if context_parallel:
            dist.all_reduce(loss)
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0 and context_parallel:
            log(plan.describe())
        log(f"step {step}: loss {losses[-1]:.4f} ({time.perf_counter() - start:.2f} s)")
    return losses


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="training steps (default: 300 on CUDA, 20 on CPU)")
    parser.add_argument("--seq-len", type=int, help="tokens per packed row (the sequence that is sharded)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--strategy", default="zigzag", choices=["zigzag", "balanced", "contiguous"])
    parser.add_argument("--schedule", default="ring", choices=["ring", "direct"])
    parser.add_argument("--single-device", action="store_true", help="no process group: plain flex_attention")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = Config() if device.type == "cuda" else replace(CPU_CONFIG, steps=20)
    overrides = {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    block = 128 if device.type == "cuda" else CPU_BLOCK
    if args.single_device:
        train(cfg, device, context_parallel=False, block=block)
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        rank = dist.get_rank()
        log = print if rank == 0 else (lambda *a, **k: None)
        log(
            f"GPT {cfg.n_layer}x{cfg.d_model}, B{cfg.batch_size} x L{cfg.seq_len} packed documents, "
            f"sequence sharded over {dist.get_world_size()} ranks ({args.strategy}, {args.schedule}), "
            f"{cfg.steps} steps"
        )
        train(cfg, device, strategy=args.strategy, schedule=args.schedule, block=block, log=log)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
