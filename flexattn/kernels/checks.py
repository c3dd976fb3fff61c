"""Input checks the kernel launchers share, and the block tables as kernel arguments."""

from __future__ import annotations

import os

import torch

from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.paged_kv import PagedKV

MAX_GRID_YZ = 65535  # CUDA's limit on grid axes y and z: the kernels put heads on y and batch on z


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_table: torch.Tensor, target: DeviceLimits
) -> tuple[int, ...]:
    """Check q (B, Hq, Lq, E), k (B, Hkv, Lkv, E), v (B, Hkv, Lkv, Ev) and their device; return (B, Hq, Lq, E).

    CPU tensors need the interpreter, unless ``target`` names a GPU: then the launch only compiles
    for it (``benchmarks/compile_report.py``)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, L, E); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    (B, Hq, Lq, E), (Bk, Hkv, Lkv, Ek), (Bv, Hv, Lv, _) = q.shape, k.shape, v.shape
    if Bk != B or Bv != B or Hkv != Hv or Lkv != Lv or Ek != E:
        raise ValueError(
            f"Shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
            "k (B, Hkv, Lkv, E) and v (B, Hkv, Lkv, Ev)."
        )
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}.")
    dtype, device = q.dtype, q.device
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != dtype or v.dtype != dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (device == k.device == v.device == mask_table.device):
        raise ValueError(
            f"q, k, v and the block mask must be on one device; got {q.device}, {k.device}, "
            f"{v.device}, {mask_table.device}."
        )
    if device.type == "cpu" and target.capability is None and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("The Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors.")
    if B > MAX_GRID_YZ or Hq > MAX_GRID_YZ:
        raise ValueError(
            f"The Triton kernels launch one program row per head and batch element (CUDA grid axes y and z, "
            f"at most {MAX_GRID_YZ} each); got B={B}, Hq={Hq}. Split the batch into chunks of at most "
            f"{MAX_GRID_YZ}, or use kernel_options={{'BACKEND': 'REFERENCE'}}."
        )
    return B, Hq, Lq, E


def check_call_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_table: torch.Tensor,
    target: DeviceLimits,
    paged: PagedKV | None,
) -> tuple[int, int, int, int, int]:
    """:func:`check_qkv` for K/V that are contiguous (``paged`` None) or paged caches
    (1, Hkv, n_pages * page_size, E / Ev), which broadcast over the batch (the page table's row says
    where each sequence's rows live; ``PagedKV.check``). Returns (B, Hq, Lq, E, Lkv), Lkv the call's
    logical key length (``paged.kv_len`` for a paged cache)."""
    if paged is None:
        return (*check_qkv(q, k, v, mask_table, target), k.shape[2])
    paged.check(k, v, q.shape[0])
    return (
        *check_qkv(q, *(t.expand(q.shape[0], -1, -1, -1) for t in (k, v)), mask_table, target),
        paged.kv_len,
    )


SIDES = {
    "kv": ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"),
    "q": ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"),
}  # one view of the block tables: partial counts, partial indices, full counts, full indices


def check_block_tables(tables: BlockTables, side: str, B: int, H: int, rows: int, rows_need: str) -> None:
    """Check one view (``side`` "kv" or "q") of ``tables``.

    Counts are int32 (MB, MH, ROWS), indices (MB, MH, ROWS, COLS) with MB in {1, B}, MH in {1, H},
    ROWS >= ``rows`` (``rows_need`` says why); the full pair is given or None together.
    """
    names = SIDES[side]
    num_name, idx_name, full_num_name, full_idx_name = names
    num, idx, full_num, full_idx = [getattr(tables, name) for name in names]
    if num is not None and idx is not None and _well_formed(num, idx, full_num, full_idx, B, H, rows):
        return  # every check below passes (the repeat call's path: one pass over the shapes)
    if num is None or idx is None:
        raise ValueError(
            f"{num_name} and {idx_name} are required here; "
            + (
                "derive the transposed view with block_mask_build.complete_q_side(tables)."
                if side == "q"
                else ""
            )
        )
    for name, t, dims in ((num_name, num, 3), (idx_name, idx, 4), (full_num_name, full_num, 3),
                          (full_idx_name, full_idx, 4)):  # fmt: skip
        if t is None:
            continue
        if t.device != num.device:
            raise ValueError(
                f"{name} is on {t.device} but {num_name} on {num.device}; move the BlockMask with .to()."
            )
        if t.dim() != dims or t.dtype != torch.int32 or t.shape[0] not in (1, B) or t.shape[1] not in (1, H):
            raise ValueError(
                f"{name} must be int32 with {dims} dims (1 or {B}, 1 or {H}, ...); "
                f"got {t.dtype} {tuple(t.shape)}."
            )
        if t.shape[2] < rows:
            kind = "q" if side == "kv" else "kv"
            raise ValueError(
                f"{name} has {t.shape[2]} {kind} blocks but {rows_need} needs {rows}; "
                "was the BlockMask built for this length?"
            )
    if (full_num is None) != (full_idx is None):
        raise ValueError(f"{full_num_name} and {full_idx_name} must both be given or both be None.")
    grid_shape = tuple(idx.shape)  # (MB, MH, ROWS, COLS): every table of the view shares it
    for name, t in ((num_name, num), (full_num_name, full_num), (full_idx_name, full_idx)):
        if t is not None and tuple(t.shape) != grid_shape[: t.dim()]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {idx_name} {grid_shape}: they must agree.")


def _well_formed(num, idx, full_num, full_idx, B: int, H: int, rows: int) -> bool:
    """True only if :func:`check_block_tables` accepts these tables (False: let it say why)."""
    grid = idx.shape
    int32, device = torch.int32, num.device
    if not (
        len(grid) == 4 and grid[0] in (1, B) and grid[1] in (1, H) and grid[2] >= rows
        and num.shape == grid[:3] and num.dtype == int32 and idx.dtype == int32 and idx.device == device
    ):  # fmt: skip
        return False
    if full_num is None or full_idx is None:
        return full_num is None and full_idx is None
    return (
        full_num.shape == grid[:3] and full_idx.shape == grid and full_num.dtype == int32
        and full_idx.dtype == int32 and full_num.device == device and full_idx.device == device
    )  # fmt: skip


def block_table_args(tables: BlockTables, side: str) -> tuple[tuple, dict]:
    """Kernel arguments of one view (``side`` "kv" or "q"): (tables and their sizes, constexpr flags).

    Returns ``((num, idx, full_num, full_idx, MASK_H, ROWS, COLS), {"MASK_PER_BATCH", "MASK_PER_HEAD"})``
    with contiguous tables; a batch or head dim of size 1 is broadcast (its flag is 0). The partial
    tables stand in for absent full ones (the kernel's HAS_FULL flag is then False).
    """
    num, idx, full_num, full_idx = [getattr(tables, name) for name in SIDES[side]]
    if full_num is None:
        full_num, full_idx = num, idx
    lists = (num.contiguous(), idx.contiguous(), full_num.contiguous(), full_idx.contiguous())
    mask_b, mask_h, rows, cols = idx.shape
    return (*lists, mask_h, rows, cols), {"MASK_PER_BATCH": int(mask_b > 1), "MASK_PER_HEAD": int(mask_h > 1)}
