"""The CPU fast path (issue #15): flex_attention on CPU tensors in fp32 / bf16 / fp16.

    choice.py        which engine runs a call and why (pure)
    chunks.py        runs of query blocks and the keys they visit, from the BlockMask
    chunk_masks.py   a chunk's additive float mask (mask_mod only on partial blocks) and bias
    sdpa_engine.py   masks and additive mods: PyTorch's CPU flash kernel per chunk, fwd and bwd
    fused_engine.py  any score_mod: chunked fp32 matmul + mod + softmax, LSE-only backward
    mod_graph.py     a score_mod and its derivative from the compiler's IR, in place (fused engine)
    scales.py        the mod graph's constant factors gathered into one multiply (fewer passes)

Same semantics as every backend (docs/architecture.md, "Semantics"); memory stays one chunk's
mask / scores, never B*H*Lq*Lkv. What falls back to the reference backend, and why, is
``choice.choose_cpu_engine``'s to say (``flexattn.dispatch.explain_backend`` prints it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexattn.block_mask import BlockMask
from flexattn.cpu.choice import CpuChoice, choose_cpu_engine
from flexattn.cpu.chunk_masks import ChunkMasks
from flexattn.cpu.chunks import plan_chunks
from flexattn.cpu.fused_engine import FusedAttention, FusedRun, fused_forward
from flexattn.cpu.mod_graph import mod_graph
from flexattn.cpu.sdpa_engine import SdpaAttention, SdpaRun, sdpa_forward
from flexattn.mod_eval import grad_captures

__all__ = ["CpuChoice", "choose_cpu_engine", "cpu_attention", "score_kind"]


def score_kind(score_mod: Callable | None, fingerprint=None) -> tuple[str, str, tuple]:
    """``(kind, name, learnable)``: "none" / "additive" / "general", the mod's name and its captured
    tensors that require grad, from the mod compiler (cached by fingerprint)."""
    if score_mod is None:
        return "none", "", ()
    from flexattn.compiler import compile_score_mod  # (loads on first use)

    mod = compile_score_mod(score_mod, device=torch.device("cpu"), fingerprint=fingerprint)
    kind = "none" if mod.trivial else ("additive" if mod.bias_fn is not None else "general")
    return kind, mod.name, tuple(mod.grad_captures)


def cpu_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    scale: float,
    *,
    choice: CpuChoice,
    additive: bool,
    want_max: bool = True,
    fast_math: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flex attention on the CPU engine ``choice`` names ("sdpa" or "fused"), differentiable.

    Args:
        query (B, Hq, Lq, E), key (B, Hkv, Lkv, E), value (B, Hkv, Lkv, Ev): CPU, fp32/bf16/fp16,
            validated by flexattn.api. block_mask: for exactly (Lq, Lkv), or None.
        additive: the score_mod is ``score + f`` (``score_kind``); the sdpa engine needs it.
        want_max: compute max_scores (the fused engine only; None is returned otherwise).
        fast_math: the mod's tanh may be approximated (``options.fast_math_for``: fp16 / bf16
            inputs; the fused engine's mod graph, wherever the value decides no mask bit or index).
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse (B, Hq, Lq) fp32; max_scores or None.

    Example:
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> choice = choose_cpu_engine(dtype=q.dtype)
        >>> out, lse, _ = cpu_attention(q, k, v, None, None, 0.25, choice=choice, additive=False)
        >>> out.shape
        torch.Size([1, 2, 300, 16])
    """
    B, Hq, Lq, _ = query.shape
    Lkv = key.shape[2]
    mask_mod = None if block_mask is None else block_mask.mask_mod
    blocks = (Lq, Lkv) if block_mask is None else tuple(block_mask.BLOCK_SIZE)
    grad = torch.is_grad_enabled()
    if choice.engine == "sdpa":
        masks = ChunkMasks(mask_mod, score_mod if additive else None, B, Hq, blocks, query.device)
        run = SdpaRun(plan_chunks(block_mask, Lq, Lkv), masks, scale, Lkv)
        if grad and any(t.requires_grad for t in (query, key, value)):
            out, lse = SdpaAttention.apply(run, query, key, value)
        else:
            with torch.no_grad():
                out, lse = sdpa_forward(run, query, key, value)
        return out, lse, None
    if choice.engine != "fused":
        raise ValueError(f"cpu_attention runs the 'sdpa' or 'fused' engine, not {choice.engine!r}.")
    masks = ChunkMasks(mask_mod, None, B, Hq, blocks, query.device)
    # one query block per masked chunk: little of a diagonal block's empty half is computed
    captures = grad_captures(score_mod, query.device) if grad else []
    graph = None if score_mod is None or captures else mod_graph(score_mod, query.device, fast_math)
    run = FusedRun(plan_chunks(block_mask, Lq, Lkv, rows=blocks[0]), masks, score_mod, scale, Lkv, graph)
    if grad and (captures or any(t.requires_grad for t in (query, key, value))):
        return FusedAttention.apply(run, want_max, query, key, value, *captures)
    with torch.no_grad():
        return fused_forward(run, query, key, value, want_max)
