"""Backend choice: the Triton kernels or the chunked PyTorch reference.

``run_attention`` receives arguments already validated and normalised by flexattn.api and returns
``(out, lse, max_scores)`` from whichever backend :func:`choose_backend` names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flexattn.block_mask import BlockMask, noop_mask
from flexattn.mod_eval import check_mod
from flexattn.options import KernelOptions, KernelOptionsWarning, fast_math_for
from flexattn.reference import reference_attention

if TYPE_CHECKING:  # (the kernels load on first use)
    from flexattn.kernels.paged_kv import PagedKV
    from flexattn.kernels.positions import Positions


def choose_backend(device: torch.device, options: KernelOptions, dtype: torch.dtype | None = None) -> str:
    """The backend for tensors of ``dtype`` on ``device``: "TRITON", "CPU" or "REFERENCE".

    BACKEND "AUTO" picks the Triton kernels for CUDA tensors in fp16/bf16/fp32, the CPU fast path
    (``flexattn.cpu``) for CPU tensors in those dtypes, and the reference backend otherwise (fp64:
    the oracle's precision; other devices). The CPU path itself sends what it cannot run to the
    reference backend, saying why (``explain_backend``). "TRITON" on a non-CUDA device needs
    Triton's interpreter, and refuses fp64; "CPU" refuses non-CPU tensors; both with a clear error.

    Example:
        >>> choose_backend(torch.device("cpu"), KernelOptions(), torch.float32)
        'CPU'
    """
    if options.BACKEND == "REFERENCE":
        return _warn_unread_options("REFERENCE", options, "kernel_options BACKEND='REFERENCE'")
    if options.BACKEND == "AUTO":
        if dtype == torch.float64:
            return _warn_unread_options("REFERENCE", options, "float64 inputs")
        backend = {"cuda": "TRITON", "cpu": "CPU"}.get(device.type, "REFERENCE")
        return (
            backend if backend == "TRITON" else _warn_unread_options(backend, options, f"tensors on {device}")
        )
    if options.BACKEND == "CPU":
        if device.type != "cpu":
            raise ValueError(
                f"kernel_options={{'BACKEND': 'CPU'}} needs CPU tensors, but query is on {device}. "
                "Move the tensors with .cpu(), or use BACKEND 'AUTO'."
            )
        return _warn_unread_options("CPU", options, "kernel_options BACKEND='CPU'")
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


def _warn_unread_options(backend: str, options: KernelOptions, why: str) -> str:
    """``backend`` ("CPU" or "REFERENCE"); where the call sets options only the GPU kernels read, a
    ``KernelOptionsWarning`` first (they do nothing here, and ignoring them silently would hide that;
    an error would break code that passes the same options on every device, as PyTorch's examples do)."""
    changed = options.kernel_only_changes()
    if changed:
        values = ", ".join(f"{name}={getattr(options, name)!r}" for name in changed)
        warnings.warn(
            f"kernel_options {values} configure the GPU kernels, but this call runs the {backend} backend "
            f"({why}), which has no such knobs: they do nothing here. Pass them only for CUDA tensors "
            "(`options if q.is_cuda else None`), or run the kernels (CUDA tensors, or BACKEND 'TRITON' with "
            "TRITON_INTERPRET=1 on CPU).",
            KernelOptionsWarning,
            stacklevel=2,
        )
    return backend


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


def check_mods_on_grid(
    score_mod, mask_mod, grid: tuple[int, int, int, int], device, fingerprints=None
) -> bool:
    """The compiler's trace-time refusals for both mods on ``grid`` = (B, Hq, Q_LEN, KV_LEN); True
    when they pass. ``fingerprints``: the mods' ``CallFingerprints`` (eager calls), or None. A
    trace-time constant under torch.compile (``flexattn.custom_ops``), so Dynamo never traces the
    mod compiler."""
    from flexattn.compiler.checks import check_mod as check_traced

    score_fp, mask_fp = (None, None) if fingerprints is None else (fingerprints.score, fingerprints.mask)
    for mod, kind, fp in ((score_mod, "score", score_fp), (mask_mod, "mask", mask_fp)):
        if mod is not None and mod is not noop_mask:  # (nothing to check, ~10 us saved per call)
            check_traced(mod, kind, grid, device, fingerprint=fp)
    return True


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
    positions: Positions | None = None,
    need_max_scores: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
        positions: checked ``Positions`` (not the default), or None (the reference backend and
            the decode kernel read them).
        need_max_scores: the caller reads max_scores (the CPU path returns None for it otherwise).
    Returns:
        out (B, Hq, Lq, Ev) in query's dtype; lse, max_scores (B, Hq, Lq) fp32 (natural log).
    """
    if backend == "CPU":
        choice, kind = cpu_choice(query, score_mod, positions, kv_pages, need_max_scores, fingerprints)
        if choice.engine != "reference":
            from flexattn.cpu import cpu_attention

            return cpu_attention(query, key, value, score_mod, block_mask, scale, choice=choice,
                                 additive=kind == "additive", want_max=need_max_scores,
                                 fast_math=fast_math_for(options, query.dtype))  # fmt: skip
        backend = "REFERENCE"
    if backend == "REFERENCE":
        if kv_pages is not None:  # the oracle gathers the pages; the kernels read them in place
            key, value = kv_pages.gather(key), kv_pages.gather(value)
        return reference_attention(query, key, value, score_mod, block_mask, scale, positions=positions)
    from flexattn.autograd import triton_flex_attention

    return triton_flex_attention(
        query,
        key,
        value,
        score_mod,
        block_mask,
        scale,
        options,
        kv_pages=kv_pages,
        fingerprints=fingerprints,
        positions=positions,
    )


def cpu_choice(query, score_mod, positions, kv_pages, need_max_scores: bool, fingerprints=None):
    """``(CpuChoice, score kind)`` for a call on the CPU backend (``flexattn.cpu.choice``)."""
    from flexattn.cpu import choose_cpu_engine, score_kind

    where = dict(
        dtype=query.dtype, compiling=torch.compiler.is_compiling(), paged=kv_pages is not None,
        positions=positions is not None and not positions.is_default,
    )  # fmt: skip
    first = choose_cpu_engine(**where)
    if first.engine == "reference":
        return first, "none"
    kind, name, learnable = score_kind(score_mod, getattr(fingerprints, "score", None))
    learnable = torch.is_grad_enabled() and any(t.requires_grad for t in learnable)
    choice = choose_cpu_engine(**where, score_kind=kind, score_name=name, learnable=learnable,
                               want_max=need_max_scores)  # fmt: skip
    return choice, kind


def explain_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    kernel_options=None,
    *,
    positions: Positions | None = None,
    max_scores: bool = False,
) -> str:
    """Which backend ``flex_attention`` runs for these arguments and why (and, on the CPU fast path,
    its engine and chunks). ``max_scores``: the call asks for them (``return_aux``).

    Example:
        >>> q = torch.randn(1, 2, 256, 16)
        >>> print(explain_backend(q, q, q))  # doctest: +ELLIPSIS
        backend: CPU
        engine: sdpa: mask only: ...
    """
    options = KernelOptions.from_user(kernel_options)
    backend = choose_backend(query.device, options, query.dtype)
    lines = [f"backend: {backend}"]
    if backend == "CPU":
        kv_pages = getattr(block_mask, "kv_pages", None)
        choice, _ = cpu_choice(query, score_mod, positions, kv_pages, max_scores)
        lines.append(f"engine: {choice}")
        if choice.engine != "reference":
            from flexattn.cpu.chunks import plan_chunks

            chunks = plan_chunks(block_mask, query.shape[2], key.shape[2])
            computed = sum(c.rows * c.cols for c in chunks) / (query.shape[2] * key.shape[2])
            masked = sum(c.classes is not None for c in chunks)
            lines.append(f"chunks: {len(chunks)} ({masked} with a mask), {computed:.1%} of Lq x Lkv computed")
    return "\n".join(lines)
