"""One attention call of a ring step: local queries against one visiting K/V segment, mods at
global positions.

This is the only place that knows how offsets reach the mods. Until ``flex_attention`` takes
``positions=`` (``flexattn.kernels.positions.Positions``), the mods are wrapped so that they see
``q_idx + q_offset`` and ``kv_idx + kv_offset``, with the offsets captured as int32 0-dim tensors:
they are runtime arguments of the compiled mods, so a new offset never generates new code, and the
tensors are made once per shard pair (``ShardCall``), so repeat calls hit the mod fingerprint cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from flexattn.api import flex_attention
from flexattn.block_mask import BlockMask, noop_mask
from flexattn.kernels.positions import Positions


@dataclass(frozen=True)
class ShardCall:
    """The fixed parts of one (query segment, key segment) call.

    Fields:
        block_mask: the global mask sliced to the segments' (q blocks, kv blocks), seq_lengths
            (q segment length, kv segment length); its mask_mod is the global one (global positions).
        positions: where the segments start in the global sequence.
        offsets: ``(q_offset, kv_offset)`` as int32 0-dim tensors on the mask's device.
    """

    block_mask: BlockMask
    positions: Positions
    offsets: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def make(cls, block_mask: BlockMask, q_offset: int, kv_offset: int) -> ShardCall:
        device = block_mask.kv_indices.device
        offsets = tuple(torch.tensor(o, dtype=torch.int32, device=device) for o in (q_offset, kv_offset))
        return cls(block_mask, Positions(q_offset=q_offset, kv_offset=kv_offset), offsets)


def shard_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    call: ShardCall,
    scale: float,
    enable_gqa: bool,
    kernel_options: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flex_attention(..., return_lse=True)`` on one query segment and one key segment.

    Args:
        query (B, Hq, Lq_seg, E), key (B, Hkv, Lkv_seg, E), value (B, Hkv, Lkv_seg, Ev): the segments'
            rows; the mods see them at ``call.positions``.
    Returns:
        out (B, Hq, Lq_seg, Ev), lse (B, Hq, Lq_seg): this segment pair's partial result, differentiable
        in query, key, value, lse and the score_mod's captured tensors.
    """
    q_offset, kv_offset = call.offsets
    mask = call.block_mask
    if mask.mask_mod is not noop_mask:
        mask = replace(mask, mask_mod=_shifted_mask(mask.mask_mod, q_offset, kv_offset))
    if score_mod is not None:
        score_mod = _shifted_score(score_mod, q_offset, kv_offset)
    return flex_attention(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=mask,
        scale=scale,
        enable_gqa=enable_gqa,
        return_lse=True,
        kernel_options=kernel_options,
    )


def _shifted_score(score_mod: Callable, q_offset: torch.Tensor, kv_offset: torch.Tensor) -> Callable:
    def score_at_global_positions(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + q_offset, kv_idx + kv_offset)

    return score_at_global_positions


def _shifted_mask(mask_mod: Callable, q_offset: torch.Tensor, kv_offset: torch.Tensor) -> Callable:
    def mask_at_global_positions(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx + kv_offset)

    return mask_at_global_positions
