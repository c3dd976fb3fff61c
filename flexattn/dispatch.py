"""Backend choice: the Triton kernels or the chunked PyTorch reference.

``run_attention`` receives arguments already validated and normalised by flexattn.api and returns
``(out, lse, max_scores)`` from whichever backend :func:`choose_backend` names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flexattn.block_mask import BlockMask
from flexattn.mod_eval import check_mod
from flexattn.options import KernelOptions
from flexattn.reference import reference_attention

if TYPE_CHECKING:
    from flexattn.kernels.paged_kv import PagedKV  # (the kernels load on first use)


def choose_backend(device: torch.device, options: KernelOptions, dtype: torch.dtype | None = None) -> str:
    """The backend for tensors of ``dtype`` on ``device``: "TRITON" or "REFERENCE".

    BACKEND "AUTO" picks the Triton kernels for CUDA tensors in fp16/bf16/fp32 and the reference
    backend otherwise (CPU tensors, fp64: the kernels have no fp64 path). "TRITON" on a non-CUDA
    device needs Triton's interpreter, and refuses fp64; both raise a clear error.

    Example:
        >>> choose_backend(torch.device("cpu"), KernelOptions())
        'REFERENCE'
    """
    if options.BACKEND == "REFERENCE":
        return "REFERENCE"
    if options.BACKEND == "AUTO":
        return "TRITON" if device.type == "cuda" and dtype != torch.float64 else "REFERENCE"
    if dtype == torch.float64:
        raise ValueError(
            "kernel_options={'BACKEND': 'TRITON'}: the Triton kernels take fp16, bf16 or fp32, but the "
            "inputs are torch.float64. Use BACKEND 'REFERENCE' (or 'AUTO') for fp64, or convert the inputs."
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kernel_options={{'BACKEND': 'TRITON'}} needs CUDA tensors, but query is on {device}. "
            "Move the tensors to a GPU, set the environment variable TRITON_INTERPRET=1 before starting "
            "Python to run the kernels in Triton's (slow) interpreter, or use BACKEND 'AUTO'/'REFERENCE'."
        )
    return "TRITON"


def check_call(score_mod, mask_mod, kernel_options, device, dtype) -> tuple[str, tuple]:
    """The checks of a call's mods and options; ``(backend, (BLOCK_M, BLOCK_N))``.

    ``kernel_options``: the user's dict, or KernelOptions already parsed from it.

    Plain Python on every eager call. ``flexattn.custom_ops`` marks it a trace-time constant for
    torch.compile (``torch._dynamo.assume_constant_result``), so ``import flexattn`` needs no Dynamo;
    the values it reads are guarded by the custom-op path (``custom_ops.traced_attention``).
    """
    options = KernelOptions.from_user(kernel_options)
    if score_mod is not None:
        check_mod(score_mod, "score_mod", "score_mod")
    if mask_mod is not None:
        check_mod(mask_mod, "block_mask.mask_mod", "mask_mod")
    return choose_backend(device, options, dtype), (options.BLOCK_M, options.BLOCK_N)


def run_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    scale: float,
    options: KernelOptions,
    backend: str,
    *,
    kv_pages: PagedKV | None = None,
    fingerprints=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run attention on ``backend`` (from :func:`choose_backend`).

    Args:
        query (B, Hq, Lq, E), key (B, Hkv, Lkv, E), value (B, Hkv, Lkv, Ev): same dtype and device;
            Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        score_mod: the user's score_mod, or None for the identity.
        block_mask: a BlockMask for exactly (Lq, Lkv) on the tensors' device, or None (attend everywhere).
        scale: finite float. options: validated KernelOptions.
        kv_pages: key / value are paged caches (1, Hkv, rows, E) read through this page table
            (``flexattn.paged``; inference only), or None. The reference backend gathers them.
        fingerprints: the mods' ``compiler.fingerprint.CallFingerprints`` from this call's checks,
            or None (the Triton path then fingerprints them itself).
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse, max_scores (B, Hq, Lq) fp32 (natural log).
    """
    if backend == "REFERENCE":
        if kv_pages is not None:  # the oracle gathers the pages; the kernels read them in place
            key, value = kv_pages.gather(key), kv_pages.gather(value)
        return reference_attention(query, key, value, score_mod, block_mask, scale)
    from flexattn.autograd import triton_flex_attention

    return triton_flex_attention(
        query, key, value, score_mod, block_mask, scale, options, kv_pages=kv_pages, fingerprints=fingerprints
    )
