"""create_block_mask on the device: which builder runs, and the generated kernel's host side.

Two builders produce the same BlockMask (``to_dense()`` equal, same rules for tail blocks):

- ``"triton"``: the mask mod compiled by the mod compiler into a classification kernel
  (``kernels/block_mask_kernel.py``) that decides most tiles from their index ranges (interval
  analysis, ``compiler/intervals.py``) and evaluates only the undecided ones element by element. All
  on the device, no host synchronisation, memory O(blocks). The default on CUDA; on CPU it runs in
  Triton's interpreter when asked for (``backend="triton"`` with ``TRITON_INTERPRET=1``), for tests.
- ``"torch"``: the chunked element-wise evaluation of ``block_mask_build.classify_blocks`` (vmap
  semantics). The default on CPU, and the fallback for mods the compiler cannot trace (the
  reason is logged, and ``explain_block_mask`` states it).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from flexattn.compiler import ModCompileError, compile_block_mask_mod
from flexattn.kernels.block_mask_kernel import BlockMaskMod, build_block_tables
from flexattn.kernels.block_tables import BlockTables

BACKENDS = ("auto", "triton", "torch")
MAX_GRAIN = 64  # positions per grain of the captured tensors' min/max tables

_LOG = logging.getLogger("flexattn.block_mask")


@dataclass(frozen=True)
class BuilderChoice:
    """Which builder ``create_block_mask`` uses and why; ``mod`` is the compiled mod for "triton"."""

    builder: str
    reason: str
    mod: BlockMaskMod | None = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def grain_for(q_block: int, kv_block: int) -> int:
    """Grain of the min/max tables of long captured rows: the largest power of two <= MAX_GRAIN
    dividing both block sizes, so that tiles cover whole grains and gathers are bounded exactly
    (``compiler.intervals.table_grain`` keeps short rows per position)."""
    common = math.gcd(q_block, kv_block)
    return min(MAX_GRAIN, common & -common)


def choose_builder(
    mask_mod, device: torch.device, backend: str, q_block: int, kv_block: int
) -> BuilderChoice:
    """Pick the builder for ``create_block_mask(..., backend=backend)`` (compiling the mod if Triton)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return BuilderChoice("torch", "backend='torch' was requested")
    if device.type == "cpu" and backend == "auto":
        return BuilderChoice(
            "torch",
            "CPU tensors (backend='triton' with TRITON_INTERPRET=1 runs the kernel in Triton's interpreter)",
        )
    if device.type == "cpu" and not _interpreted():
        raise ValueError(
            "create_block_mask(backend='triton') on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing flexattn, or use device='cuda'."
        )
    if device.type not in ("cpu", "cuda"):
        if backend == "triton":
            raise ValueError(f"create_block_mask(backend='triton') needs a CUDA or CPU device, got {device}.")
        return BuilderChoice("torch", f"no generated kernel for {device.type} tensors")
    grain = grain_for(q_block, kv_block)
    try:
        mod = compile_block_mask_mod(mask_mod, device=device, grain=grain)
    except ModCompileError as e:
        if backend == "triton":
            raise
        name = getattr(mask_mod, "__name__", mask_mod)
        _LOG.info("create_block_mask(%s): the mod does not compile, using the torch builder: %s", name, e)
        return BuilderChoice("torch", f"the mask mod does not compile for the kernel: {e}")
    return BuilderChoice("triton", "generated kernel (interval analysis + element-wise undecided tiles)", mod)


def build_tables(
    choice: BuilderChoice, B: int, H: int, q_len: int, kv_len: int, q_block: int, kv_block: int,
    device: torch.device, separate_full: bool,
) -> BlockTables:  # fmt: skip
    """Run the generated kernel of a "triton" choice: the BlockMask's kv-side tables (q side on first use)."""
    return build_block_tables(choice.mod, B, H, q_len, kv_len, q_block, kv_block, device, separate_full)


def explain_block_mask(mask_mod, device=None, backend: str = "auto", BLOCK_SIZE=128) -> str:
    """Which builder ``create_block_mask`` would use for ``mask_mod`` on ``device``, and why.

    Example:
        >>> explain_block_mask(lambda b, h, q, kv: q >= kv, device="cpu").split(":")[0]
        'torch'
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    q_block, kv_block = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else BLOCK_SIZE
    choice = choose_builder(mask_mod, device, backend, q_block, kv_block)
    return f"{choice.builder}: {choice.reason}"
