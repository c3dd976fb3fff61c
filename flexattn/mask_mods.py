"""Mask-mod combinators: noop_mask, and_masks, or_masks (as in torch.nn.attention.flex_attention).

Each returns a plain per-element mask_mod with a readable ``__name__``, so composed mods run
unchanged on every backend and in the mod compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexattn.mod_eval import check_mod


def noop_mask(
    batch: torch.Tensor, head: torch.Tensor, token_q: torch.Tensor, token_kv: torch.Tensor
) -> torch.Tensor:
    """The mask_mod that allows every pair (parameter names as in PyTorch)."""
    return batch.new_ones((), dtype=torch.bool)


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a pair when every one of ``mask_mods`` allows it (all, if none given).

    Example:
        >>> causal = lambda b, h, q, kv: q >= kv
        >>> near = lambda b, h, q, kv: q - kv < 64
        >>> sliding_causal = and_masks(causal, near)
    """
    for i, fn in enumerate(mask_mods):
        check_mod(fn, f"and_masks argument {i}", "mask_mod")

    def and_mask(b, h, q_idx, kv_idx):
        result = b.new_ones((), dtype=torch.bool)
        for fn in mask_mods:
            result = result & fn(b, h, q_idx, kv_idx)
        return result

    and_mask.__name__ = "and_masks(" + ", ".join(getattr(m, "__name__", "mask") for m in mask_mods) + ")"
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod allowing a pair when any of ``mask_mods`` allows it (none, if none given).

    Example:
        >>> prefix = lambda b, h, q, kv: kv < 16
        >>> causal = lambda b, h, q, kv: q >= kv
        >>> prefix_lm = or_masks(prefix, causal)
    """
    for i, fn in enumerate(mask_mods):
        check_mod(fn, f"or_masks argument {i}", "mask_mod")

    def or_mask(b, h, q_idx, kv_idx):
        result = b.new_zeros((), dtype=torch.bool)
        for fn in mask_mods:
            result = result | fn(b, h, q_idx, kv_idx)
        return result

    or_mask.__name__ = "or_masks(" + ", ".join(getattr(m, "__name__", "mask") for m in mask_mods) + ")"
    return or_mask


def sliced_mask_mod_error(b, h, q_idx, kv_idx):
    """Stands in for the mask_mod of a sliced BlockMask (its indices no longer match the original)."""
    raise RuntimeError(
        "This BlockMask was sliced with [] and its mask_mod reset, because b / h / q_idx of the slice "
        "no longer match the original mask. Set one that fits the slice, e.g. "
        "`sliced.mask_mod = lambda b, h, q, kv: base.mask_mod(b, h, q + offset, kv)`."
    )
