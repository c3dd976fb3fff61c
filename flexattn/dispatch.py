"""Backend choice: the Triton kernels or the chunked PyTorch reference.

``run_attention`` receives arguments already validated and normalised by flexattn.api and returns
``(out, lse, max_scores)`` from whichever backend :func:`choose_backend` names.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from flexattn.block_mask import BlockMask
from flexattn.options import KernelOptions
from flexattn.reference import reference_attention


def choose_backend(device: torch.device, options: KernelOptions) -> str:
    """The backend for tensors on ``device``: "TRITON" or "REFERENCE".

    BACKEND "AUTO" picks the Triton kernels for CUDA tensors and the reference backend otherwise;
    "TRITON" on a non-CUDA device needs Triton's interpreter and raises a clear error without it.

    Example:
        >>> choose_backend(torch.device("cpu"), KernelOptions())
        'REFERENCE'
    """
    if options.BACKEND == "REFERENCE":
        return "REFERENCE"
    if options.BACKEND == "AUTO":
        return "TRITON" if device.type == "cuda" else "REFERENCE"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kernel_options={{'BACKEND': 'TRITON'}} needs CUDA tensors, but query is on {device}. "
            "Move the tensors to a GPU, set the environment variable TRITON_INTERPRET=1 before starting "
            "Python to run the kernels in Triton's (slow) interpreter, or use BACKEND 'AUTO'/'REFERENCE'."
        )
    return "TRITON"


def run_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask,
    scale: float,
    enable_gqa: bool,
    options: KernelOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run attention on the chosen backend.

    Args:
        query (B, Hq, Lq, E), key (B, Hkv, Lkv, E), value (B, Hkv, Lkv, Ev): same dtype and device.
        score_mod: the user's score_mod, or None for the identity.
        block_mask: a BlockMask for exactly (Lq, Lkv) on the tensors' device.
        scale: finite float. enable_gqa: whether Hq != Hkv was allowed.
        options: validated KernelOptions.
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse, max_scores (B, Hq, Lq) fp32 (natural log).
    """
    if choose_backend(query.device, options) == "REFERENCE":
        return reference_attention(query, key, value, score_mod, block_mask, scale, enable_gqa)
    from flexattn.autograd import triton_flex_attention

    return triton_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, options)
