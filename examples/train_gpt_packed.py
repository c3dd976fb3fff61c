"""Train a small GPT on packed documents with a document-causal mask: flexattn vs SDPA + dense mask.

Every batch row packs several documents of random lengths; a token may attend only to earlier
tokens of its own document. Each run trains the same model (same initial weights, same batches):

- ``flexattn``: ``create_block_mask(document_mask(doc_ids, causal()))`` per batch, then
  ``flexattn.flex_attention`` (the Triton kernels on CUDA, the reference backend on CPU); blocks
  that cross documents are skipped.
- ``flexattn-boundaries``: the same mask mod and kernels, with the BlockMask computed from the
  document boundaries (:func:`document_causal_block_mask`) instead of evaluating every element.
- ``sdpa``: ``F.scaled_dot_product_attention`` with the dense boolean mask ``(B, 1, L, L)``.
- ``torch-flex`` (CUDA only by default): PyTorch's compiled ``flex_attention`` with its own
  ``create_block_mask`` of the same mod, per batch.

Each reports tokens/s (mask construction included) and peak memory, then one summary line.

    python examples/train_gpt_packed.py                          # CUDA: 300 steps, B4 x L8192
    python examples/train_gpt_packed.py --device cpu --steps 5   # tiny model, well under a minute

Each document is BOS followed by tokens drawn from its own random "topic" of 8 of the 511 tokens,
so the loss can only fall (from ln 511 = 6.2 towards ln 8 = 2.1) by attending inside the document.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexattn import BlockMask, create_block_mask, flex_attention
from flexattn.variants import causal, document_ids_from_lengths, document_mask


@dataclass(frozen=True)
class Config:
    vocab_size: int = 512  # token 0 is BOS
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512  # head dim = d_model // n_head
    seq_len: int = 8192  # tokens per packed row
    batch_size: int = 4
    min_doc: int = 64  # document lengths are uniform in [min_doc, max_doc]
    max_doc: int = 2048
    steps: int = 300
    warmup_steps: int = 5  # excluded from the tokens/s measurement
    lr: float = 1e-3


TOPIC_SIZE = 8  # distinct tokens per document: the loss can fall from ln(511) to about ln(8)
CPU_CONFIG = Config(n_layer=2, n_head=4, d_model=128, seq_len=512, batch_size=2, min_doc=16, max_doc=160)


# ---------------------------------------------------------------------------------------------------
# Data: packed documents, each with its own small vocabulary.
# ---------------------------------------------------------------------------------------------------


def packed_batch(cfg: Config, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and document ids, both ``(B, L + 1)`` int64 / int32 (inputs are [:, :-1], targets [:, 1:])."""
    rows, ids = [], []
    for _ in range(cfg.batch_size):
        lengths, total = [], 0
        while total < cfg.seq_len + 1:
            n = int(torch.randint(cfg.min_doc, cfg.max_doc + 1, (), generator=generator))
            lengths.append(min(n, cfg.seq_len + 1 - total))
            total += lengths[-1]
        tokens = [_topic_document(n, cfg.vocab_size, generator) for n in lengths]
        rows.append(torch.cat(tokens))
        ids.append(document_ids_from_lengths(torch.tensor(lengths)))
    return torch.stack(rows), torch.stack(ids)


def _topic_document(n: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """BOS, then ``n - 1`` tokens drawn from the document's own random "topic" of 8 tokens."""
    topic = torch.randperm(vocab_size - 1, generator=generator)[:TOPIC_SIZE] + 1
    picks = torch.randint(0, TOPIC_SIZE, (n - 1,), generator=generator)
    return torch.cat([torch.zeros(1, dtype=torch.long), topic[picks]])


# ---------------------------------------------------------------------------------------------------
# Model: a plain pre-norm GPT; only the attention call differs between the two runs.
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        )  # (B, H, L, E)
        y = attend(q, k, v)  # (B, H, L, E)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        x = self.embed(tokens) + _sinusoids(positions, self.embed.embedding_dim)  # (B, L, D)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.norm(x))  # (B, L, vocab)


def _sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of each token's position inside its document, (B, L, dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=positions.device) / dim)
    angles = positions[..., None].float() * freqs  # (B, L, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# ---------------------------------------------------------------------------------------------------
# The attention implementations.
# ---------------------------------------------------------------------------------------------------


# Each factory takes the step's document ids (B, L) on the device and ``num_docs``, an upper bound on
# the documents per row known on the host (so no mask reads a value back from the GPU: no host sync).


def flexattn_attention(doc_ids: torch.Tensor, num_docs: int | None = None):
    """flexattn with the block mask from ``create_block_mask``: the mask mod evaluated everywhere."""
    B, L = doc_ids.shape
    mask_mod = document_mask(doc_ids, causal(), num_docs=num_docs)
    block_mask = create_block_mask(mask_mod, B, None, L, L, device=doc_ids.device)
    return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)


def flexattn_boundaries_attention(doc_ids: torch.Tensor, num_docs: int | None = None):
    """flexattn with the block mask derived from the document boundaries (no per-element pass)."""
    block_mask = document_causal_block_mask(doc_ids, num_docs=num_docs)
    return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)


def document_causal_block_mask(
    doc_ids: torch.Tensor, block: int = 128, num_docs: int | None = None
) -> BlockMask:
    """The document-causal BlockMask of packed rows ``doc_ids (B, L)`` straight from the boundaries.

    Documents are contiguous runs of ascending ids, so a block's documents are the range between its
    first and last token's ids. Query block ``i`` visits key block ``j <= i`` iff the ranges share a
    document; the pair is *full* (mask skipped) when ``j < i`` and one document covers both blocks.
    The kernels still apply ``document_mask(doc_ids, causal())`` inside partial blocks, so the result
    equals ``create_block_mask`` of that mod at O(B * (L / block)^2) cost instead of O(B * L^2).
    """
    B, L = doc_ids.shape
    starts = torch.arange(0, L, block, device=doc_ids.device)
    first = doc_ids[:, starts]  # (B, N): document of each block's first token
    last = doc_ids[:, (starts + block).clamp(max=L) - 1]  # (B, N): and of its last token
    below = torch.ones(len(starts), len(starts), dtype=torch.bool, device=doc_ids.device).tril(-1)
    diagonal = torch.eye(len(starts), dtype=torch.bool, device=doc_ids.device)
    shares_doc = last[:, None, :] >= first[:, :, None]  # kv block j ends in or after q block i's first doc
    one_doc = (
        (first == last)[:, :, None] & (first == last)[:, None, :] & (first[:, :, None] == first[:, None, :])
    )
    full = below & one_doc  # (B, NQ, NKV)
    partial = ((below & shares_doc) | diagonal) & ~full
    partial_num, partial_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_num[:, None],
        partial_idx[:, None],
        full_num[:, None],
        full_idx[:, None],  # (B, 1, ...)
        BLOCK_SIZE=block,
        mask_mod=document_mask(doc_ids, causal(), num_docs=num_docs),
        seq_lengths=(L, L),
        compute_q_blocks=False,  # derived on the first backward (the same kernels, later)
    )


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool (..., NQ, NKV) -> (count, indices): the visited kv blocks of each row listed first, ascending."""
    indices = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices
    return blocks.sum(-1, dtype=torch.int32), indices.to(torch.int32)


def sdpa_attention(doc_ids: torch.Tensor, num_docs: int | None = None):
    """Attention through SDPA with the equivalent dense boolean mask (B, 1, L, L)."""
    L = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    allowed = (same_doc & torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril())[:, None]
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@functools.cache
def _torch_flex_compiled():
    from torch.nn.attention import flex_attention as torch_flex

    return torch.compile(torch_flex.flex_attention)


def torch_flex_attention(doc_ids: torch.Tensor, num_docs: int | None = None):
    """PyTorch's own flex_attention (compiled) with its own ``create_block_mask``, for comparison."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    B, L = doc_ids.shape
    mask_mod = document_mask(doc_ids, causal(), num_docs=num_docs)
    block_mask = torch_create_block_mask(mask_mod, B, None, L, L, device=doc_ids.device)
    compiled = _torch_flex_compiled()
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


ATTENTION = {
    "flexattn": flexattn_attention,
    "flexattn-boundaries": flexattn_boundaries_attention,
    "sdpa": sdpa_attention,
    "torch-flex": torch_flex_attention,
}
DEFAULT_RUNS = {"cuda": list(ATTENTION), "cpu": ["flexattn", "flexattn-boundaries", "sdpa"]}


# ---------------------------------------------------------------------------------------------------
# Training loop.
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    tokens_per_s: float
    peak_memory_gb: float | None
    final_loss: float


def train(name: str, cfg: Config, device: torch.device, seed: int = 0) -> RunResult:
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    data = torch.Generator().manual_seed(seed + 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The batches are made (and pinned) before the clock starts: the data pipeline is not what is
    # measured, and on the GPU its ~5 ms of host work per batch would hide in SDPA's long steps but
    # not in flexattn's short ones. Each step still builds its masks inside the timing.
    batches = [_pinned(packed_batch(cfg, data), device) for _ in range(cfg.steps)]
    losses, start = [], None
    for step in range(cfg.steps):
        if step == min(cfg.warmup_steps, cfg.steps - 1):
            _sync(device)
            start, start_step = time.perf_counter(), step
        tokens, doc_ids = batches[step]
        num_docs = int(doc_ids.max()) + 1  # on the host: the masks then read nothing back from the GPU
        tokens, doc_ids = _to_device(tokens, device), _to_device(doc_ids, device)
        inputs, targets, ids = tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1]  # (B, L)
        positions = torch.arange(cfg.seq_len, device=device) - _doc_starts(ids)
        with autocast:
            logits = model(inputs, positions, ATTENTION[name](ids, num_docs))
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = (cfg.steps - start_step) * cfg.batch_size * cfg.seq_len / elapsed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    final_loss = torch.stack(losses[-10:]).mean().item()
    print(
        f"{name:>19}: {tokens_per_s:,.0f} tokens/s, peak memory {_gb(peak)}, loss {losses[0].item():.3f} "
        f"-> {final_loss:.3f}",
        flush=True,
    )
    return RunResult(name, tokens_per_s, peak, final_loss)


def _doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, L): the position where each token's document starts."""
    L = doc_ids.shape[1]
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, torch.arange(L, device=doc_ids.device), 0)
    return starts.cummax(dim=1).values


def _pinned(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The batch in pinned host memory for a CUDA run (its copies then do not wait for the GPU)."""
    return tuple(t.pin_memory() for t in batch) if device.type == "cuda" else batch


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch without waiting for the GPU (from pinned memory: an asynchronous copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.to(device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gb(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="training steps per run (default: 300; CPU config: 20)")
    parser.add_argument("--seq-len", type=int, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int)
    runs = ",".join(ATTENTION)
    parser.add_argument("--runs", help=f"comma-separated subset of {runs} (default: all on CUDA)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = Config() if device.type == "cuda" else replace(CPU_CONFIG, steps=20, warmup_steps=1)
    overrides = {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"GPT {cfg.n_layer}x{cfg.d_model} ({cfg.n_head} heads), B{cfg.batch_size} x L{cfg.seq_len} packed "
        f"documents of {cfg.min_doc}-{cfg.max_doc} tokens, {cfg.steps} steps on {card}",
        flush=True,
    )
    names = args.runs.split(",") if args.runs else DEFAULT_RUNS[device.type]
    results = [train(name, cfg, device) for name in names]

    baseline = next((r for r in results if r.name == "sdpa"), None)
    runs = " | ".join(
        f"{r.name} {r.tokens_per_s:,.0f} tok/s, {_gb(r.peak_memory_gb)}, loss {r.final_loss:.3f}"
        + (f", {r.tokens_per_s / baseline.tokens_per_s:.2f}x" if baseline and r is not baseline else "")
        for r in results
    )
    print(
        f"train_gpt_packed | {card} | GPT {cfg.n_layer}x{cfg.d_model} B{cfg.batch_size} L{cfg.seq_len} "
        f"docs {cfg.min_doc}-{cfg.max_doc} | {cfg.steps} steps | {runs}"
    )


if __name__ == "__main__":
    main()
