"""Neighbourhood attention (NATTEN): every query sees a fixed-size window of keys around it.

Unlike a plain sliding window, the window is shifted inward at the borders, so every query sees
exactly ``kernel_size`` keys (``kernel_h * kernel_w`` in 2D). In 2D the tokens of an image of
``height x width`` are laid out row-major: token ``t`` is pixel ``(t // width, t % width)``::

    from flexattn.variants import natten_2d

    mask_mod = natten_2d(height=32, width=32, kernel_size=7)                  # "natten_2d_32x32_k7x7"
    block_mask = create_block_mask(mask_mod, None, None, 32 * 32, 32 * 32)
"""

from __future__ import annotations

import torch


def _window_start(position, length: int, kernel: int):
    """First key (along one axis) of the window of a query at ``position``."""
    return torch.clamp(position - kernel // 2, 0, length - kernel)


def natten_1d(length: int, kernel_size: int):
    """1D neighbourhood attention over a sequence of ``length`` tokens.

    Query ``i`` sees keys ``s .. s + kernel_size - 1`` with ``s = clamp(i - kernel_size // 2, 0,
    length - kernel_size)``: centred on ``i`` inside the sequence, shifted inward at the ends.

    Example:
        >>> mask_mod = natten_1d(length=1024, kernel_size=63)              # "natten_1d_k63"
    """
    _check_kernel(kernel_size, length, "length")

    def natten_1d(b, h, q_idx, kv_idx):
        start = _window_start(q_idx, length, kernel_size)
        return (kv_idx >= start) & (kv_idx < start + kernel_size)

    natten_1d.__name__ = f"natten_1d_k{kernel_size}"
    return natten_1d


def natten_2d(height: int, width: int, kernel_size: int | tuple[int, int]):
    """2D neighbourhood attention over an image of ``height x width`` tokens (row-major order).

    Args:
        height, width: the token grid; the sequence length is ``height * width``.
        kernel_size: an int (square window) or ``(kernel_h, kernel_w)``; each at most the grid side.

    Example:
        >>> mask_mod = natten_2d(16, 24, kernel_size=(5, 7))              # "natten_2d_16x24_k5x7"
    """
    kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    _check_kernel(kernel_h, height, "height")
    _check_kernel(kernel_w, width, "width")

    def natten_2d(b, h, q_idx, kv_idx):
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        row_start = _window_start(q_row, height, kernel_h)
        col_start = _window_start(q_col, width, kernel_w)
        rows_ok = (kv_row >= row_start) & (kv_row < row_start + kernel_h)
        cols_ok = (kv_col >= col_start) & (kv_col < col_start + kernel_w)
        return rows_ok & cols_ok

    natten_2d.__name__ = f"natten_2d_{height}x{width}_k{kernel_h}x{kernel_w}"
    return natten_2d


def _check_kernel(kernel: int, length: int, length_name: str) -> None:
    if not isinstance(kernel, int) or not 1 <= kernel <= length:
        raise ValueError(f"kernel size must be an int in 1..{length_name} ({length}), got {kernel!r}.")
