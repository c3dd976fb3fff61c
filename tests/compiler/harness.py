"""A tiny kernel harness: run generated mod functions on one tile, and the eager (vmap) oracle.

The harness kernels call the device functions exactly as the attention kernels do (score tile
[M, N] fp32, b/h int32 scalars, q_idx [M, 1], kv_idx [1, N]), so tests exercise the real calling
convention through Triton's interpreter on CPU (or compiled on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _score_kernel(
    out_ptr, score_ptr, bh_ptr, q_ptr, kv_ptr, caps, FN: tl.constexpr, M: tl.constexpr, N: tl.constexpr
):
    rows = tl.arange(0, M)[:, None]
    cols = tl.arange(0, N)[None, :]
    b = tl.load(bh_ptr)
    h = tl.load(bh_ptr + 1)
    q_idx = tl.load(q_ptr + rows)
    kv_idx = tl.load(kv_ptr + cols)
    score = tl.load(score_ptr + rows * N + cols)
    tl.store(out_ptr + rows * N + cols, FN(score, b, h, q_idx, kv_idx, caps))


@triton.jit
def _mask_kernel(out_ptr, bh_ptr, q_ptr, kv_ptr, caps, FN: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, M)[:, None]
    cols = tl.arange(0, N)[None, :]
    b = tl.load(bh_ptr)
    h = tl.load(bh_ptr + 1)
    q_idx = tl.load(q_ptr + rows)
    kv_idx = tl.load(kv_ptr + cols)
    keep = FN(b, h, q_idx, kv_idx, caps)
    tl.store(out_ptr + rows * N + cols, keep.to(tl.int8))


@triton.jit
def _grad_kernel(
    dscore_ptr, score_ptr, dout_ptr, bh_ptr, q_ptr, kv_ptr, caps, grad_caps,
    GRAD_FN: tl.constexpr, M: tl.constexpr, N: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    b = tl.load(bh_ptr)
    h = tl.load(bh_ptr + 1)
    if TRANSPOSED:  # keys along rows, as in a dK/dV kernel: tiles [N, M], q_idx [1, M], kv_idx [N, 1]
        rows = tl.arange(0, N)[:, None]
        cols = tl.arange(0, M)[None, :]
        q_idx = tl.load(q_ptr + cols)
        kv_idx = tl.load(kv_ptr + rows)
        offsets = cols * N + rows
    else:
        rows = tl.arange(0, M)[:, None]
        cols = tl.arange(0, N)[None, :]
        q_idx = tl.load(q_ptr + rows)
        kv_idx = tl.load(kv_ptr + cols)
        offsets = rows * N + cols
    score = tl.load(score_ptr + offsets)
    dout = tl.load(dout_ptr + offsets)
    dscore = GRAD_FN(score, b, h, q_idx, kv_idx, dout, caps, grad_caps)
    tl.store(dscore_ptr + offsets, dscore)


def _bh(b: int, h: int, device) -> torch.Tensor:
    return torch.tensor([b, h], dtype=torch.int32, device=device)


def run_score(kmod, score, b, h, q_idx, kv_idx) -> torch.Tensor:
    """score (M, N) fp32, q_idx (M,), kv_idx (N,) int32 -> the generated score function's tile."""
    m, n = score.shape
    out = torch.empty_like(score)
    _score_kernel[(1,)](out, score, _bh(b, h, score.device), q_idx, kv_idx, kmod.args, kmod.fn, m, n)
    return out


def run_mask(kmod, b, h, q_idx, kv_idx) -> torch.Tensor:
    m, n = q_idx.numel(), kv_idx.numel()
    out = torch.empty(m, n, dtype=torch.int8, device=q_idx.device)
    _mask_kernel[(1,)](out, _bh(b, h, q_idx.device), q_idx, kv_idx, kmod.args, kmod.fn, m, n)
    return out.bool()


def run_grad(kmod, score, b, h, q_idx, kv_idx, dout, grad_buffers=None, transposed=False) -> torch.Tensor:
    """dLoss/dscore from the generated gradient function; capture grads accumulate in the buffers.

    ``transposed`` calls it on [N, M] tiles (keys along rows) as a dK/dV kernel does.
    """
    m, n = score.shape
    dscore = torch.empty_like(score)
    grad_args = () if grad_buffers is None else kmod.grad_args(grad_buffers)
    _grad_kernel[(1,)](
        dscore,
        score,
        dout,
        _bh(b, h, score.device),
        q_idx,
        kv_idx,
        kmod.args,
        grad_args,
        kmod.grad_fn,
        m,
        n,
        transposed,
    )
    return dscore


def eager_score(mod, score, b, h, q_idx, kv_idx) -> torch.Tensor:
    """The mod evaluated with vmap semantics over the tile (what PyTorch does)."""
    inner = torch.vmap(mod, in_dims=(0, None, None, None, 0))
    outer = torch.vmap(inner, in_dims=(0, None, None, 0, None))
    b, h = (torch.tensor(v, dtype=torch.int32, device=score.device) for v in (b, h))
    return outer(score, b, h, q_idx, kv_idx)


def eager_mask(mod, b, h, q_idx, kv_idx) -> torch.Tensor:
    inner = torch.vmap(mod, in_dims=(None, None, None, 0))
    outer = torch.vmap(inner, in_dims=(None, None, 0, None))
    b, h = (torch.tensor(v, dtype=torch.int32, device=q_idx.device) for v in (b, h))
    return outer(b, h, q_idx, kv_idx)
