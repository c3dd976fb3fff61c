"""Small ``@triton.jit`` helpers shared by the attention kernels (forward and backward), and the
input checks their launchers share.

Glossary (the same letters in every kernel):
    SPARSE_BLOCK  the BlockMask's block size along the iterated axis (KV_BLOCK in the forward pass)
    BLOCK         the kernel's tile along that axis; divides SPARSE_BLOCK, so one listed sparse
                  block is visited as SPARSE_BLOCK // BLOCK consecutive tiles
    LEN           the sequence length along that axis (Q_LEN or KV_LEN)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def sparse_tile_start(indices_ptr, tile, stride_index, SPARSE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """First position of the ``tile``-th BLOCK-wide tile of the sparse blocks listed at ``indices_ptr``.

    ``indices_ptr`` points at one row of ``kv_indices`` (or ``q_indices``); ``tile`` counts tiles
    over the listed blocks in order, SPARSE_BLOCK // BLOCK of them per listed block.
    """
    TILES_PER_BLOCK: tl.constexpr = SPARSE_BLOCK // BLOCK
    block = tl.load(indices_ptr + (tile // TILES_PER_BLOCK) * stride_index)
    return block * SPARSE_BLOCK + (tile % TILES_PER_BLOCK) * BLOCK


@triton.jit
def wrap_index(index, LEN):
    """Positions as the mods see them: wrapped into ``[0, LEN)`` so gathers stay in bounds on tails."""
    return index % LEN


@triton.jit
def mask_tail(scores, kv_index, KV_LEN, CHECK: tl.constexpr):
    """Set ``scores[:, j]`` to -inf where ``kv_index[j] >= KV_LEN`` (only when CHECK; else a no-op)."""
    if CHECK:
        scores = tl.where(kv_index < KV_LEN, scores, float("-inf"))
    return scores


# fmt: off
@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, N_ROWS, N_COLS,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):  # fmt: on
    """Load ``base[rows[:, None], cols[None, :]]``; zeros where a row >= N_ROWS or a column >= N_COLS.

    The bounds checks are compiled in only where the CHECK flags ask for them, so full tiles load
    without predicates. ``rows``/``cols`` are tile-local offsets (int32); ``base`` carries the
    (int64) offset of the tile's first element.
    """
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < N_ROWS) & (cols[None, :] < N_COLS), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < N_ROWS, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile



# fmt: off
@triton.jit
def load_kv_tile(src, b, hk, start, strides, LEN, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                 CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: on
    """The (BLOCK, D_PAD) K or V tile of rows ``[start, start + BLOCK)``, zero beyond LEN and D.

    With USE_TMA, ``src`` is a 4-D tensor descriptor over (B, HKV, LEN, D) whose zero padding does
    the bounds checks; otherwise ``src`` points at head (b, hk) and ``strides`` are (position, feature).
    """
    if USE_TMA:
        tile = src.load([b, hk, start, 0]).reshape(BLOCK, D_PAD)
    else:
        tile = load_tile(src + start.to(tl.int64) * strides[0], tl.arange(0, BLOCK), tl.arange(0, D_PAD),
                         strides[0], strides[1], LEN - start, D, CHECK_ROWS, D != D_PAD)
    return tile


def tma_compatible(t: torch.Tensor) -> bool:
    """Hopper tensor descriptors need a unit feature stride and 16-byte aligned base and strides."""
    size = t.element_size()
    return (
        (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(s * size % 16 == 0 for s in t.stride()[:-1])
    )


def tile_descriptors(tensors: tuple[tuple[torch.Tensor, int], ...], rows: int) -> tuple | None:
    """Tensor descriptors over 4-D (B, H, L, D) tensors, one per ``(tensor, width)`` pair, each
    loading ``[1, 1, rows, width]`` blocks (zero-padded past L and D); None when any of the tensors
    cannot be described (``tma_compatible``), so that the caller uses pointers for all of them."""
    if not all(tma_compatible(t) for t, _ in tensors):
        return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, width]) for t, width in tensors)


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes y and z: the kernels put heads on y and batch on z


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_table: torch.Tensor) -> tuple[int, ...]:
    """Check q (B, Hq, Lq, E), k (B, Hkv, Lkv, E), v (B, Hkv, Lkv, Ev) and their device; return (B, Hq, Lq, E)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (B, H, L, E); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    B, Hq, Lq, E = q.shape
    if (
        k.shape[0] != B
        or v.shape[0] != B
        or k.shape[1] != v.shape[1]
        or k.shape[2] != v.shape[2]
        or k.shape[3] != E
    ):
        raise ValueError(
            f"Shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
            "k (B, Hkv, Lkv, E) and v (B, Hkv, Lkv, Ev)."
        )
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={k.shape[1]}.")
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device == mask_table.device):
        raise ValueError(
            f"q, k, v and the block mask must be on one device; got {q.device}, {k.device}, "
            f"{v.device}, {mask_table.device}."
        )
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("The Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors.")
    if B > MAX_GRID_YZ or Hq > MAX_GRID_YZ:
        raise ValueError(
            f"The Triton kernels launch one program row per head and batch element (CUDA grid axes y and z, "
            f"at most {MAX_GRID_YZ} each); got B={B}, Hq={Hq}. Split the batch into chunks of at most "
            f"{MAX_GRID_YZ}, or use kernel_options={{'BACKEND': 'REFERENCE'}}."
        )
    return B, Hq, Lq, E


def check_block_tables(tables: dict, B: int, H: int, rows: int, rows_need: str) -> None:
    """Check one view of a BlockMask: ``{name: tensor}`` for (num, indices, full num, full indices).

    Counts are int32 (MB, MH, ROWS), indices (MB, MH, ROWS, COLS) with MB in {1, B}, MH in {1, H},
    ROWS >= ``rows`` (``rows_need`` says why); the full pair is given or None together.
    """
    (num_name, num), (idx_name, idx), (full_num_name, full_num), (full_idx_name, full_idx) = tables.items()
    for name, t, dims in ((num_name, num, 3), (idx_name, idx, 4), (full_num_name, full_num, 3),
                          (full_idx_name, full_idx, 4)):  # fmt: skip
        if t is None:
            continue
        if t.device != num.device:
            raise ValueError(f"{name} is on {t.device} but {num_name} on {num.device}; move the BlockMask with .to().")
        if t.dim() != dims or t.dtype != torch.int32 or t.shape[0] not in (1, B) or t.shape[1] not in (1, H):
            raise ValueError(
                f"{name} must be int32 with {dims} dims (1 or {B}, 1 or {H}, ...); "
                f"got {t.dtype} {tuple(t.shape)}."
            )
        if t.shape[2] < rows:
            kind = "q" if num_name.startswith(("kv", "full_kv")) else "kv"
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


def block_table_args(num, idx, full_num, full_idx) -> tuple[tuple, dict]:
    """Kernel arguments of one BlockMask view: (tables and their sizes, constexpr broadcast flags).

    Returns ``((num, idx, full_num, full_idx, MASK_H, ROWS, COLS), {"MASK_PER_BATCH", "MASK_PER_HEAD"})``
    with contiguous tables; a batch or head dim of size 1 is broadcast (its flag is 0). The partial
    tables stand in for absent full ones (the kernel's HAS_FULL flag is then False).
    """
    if full_num is None:
        full_num, full_idx = num, idx
    tables = tuple(t.contiguous() for t in (num, idx, full_num, full_idx))
    mask_b, mask_h, rows, cols = idx.shape
    return (*tables, mask_h, rows, cols), {"MASK_PER_BATCH": int(mask_b > 1), "MASK_PER_HEAD": int(mask_h > 1)}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 (as torch's matmuls do)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _fix_interpreter_scalar_index() -> None:
    """Let Triton's interpreter use loaded scalars as loop bounds under NumPy >= 2.

    The interpreter (triton 3.6) holds scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy 2 rejects for 1-d arrays; every kernel whose loop count is read from
    memory (the block-sparse loops) would fail on CPU. Compiled GPU kernels are unaffected.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "flexattn_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.flexattn_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()
