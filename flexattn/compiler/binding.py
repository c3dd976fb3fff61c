"""Binding a compiled mod to its captured tensors: ``KernelMod.args`` and the gradient buffers.

The generated device functions take every captured tensor with its sizes and strides as runtime
arguments (encoded ints, ``analysis.encode_int``), so one compiled mod serves any tensors of the
same dtypes, ranks and requires_grad: the fingerprint cache rebuilds a hit from live tensors, and
torch.compile's custom ops bind the tensors each call passes.
"""

from __future__ import annotations

import dataclasses

import torch

from flexattn.compiler.analysis import encode_int
from flexattn.compiler.ir import capture_spec
from flexattn.kernels.mods import KernelMod


def bind_captures(
    kernel_mod: KernelMod, captures: tuple[torch.Tensor, ...], *, check: bool = True
) -> KernelMod:
    """The same compiled mod reading ``captures`` instead of ``kernel_mod.captures``.

    The generated code takes the captured tensors, their sizes and strides as runtime arguments,
    so any tensors of the same dtypes and ranks serve (torch.compile's runtime binds the tensors of
    each call this way). With ``check``, those are compared and a mismatch raises ValueError;
    ``kernel_mod.captures`` empty skips the comparison. Which captures receive gradients stays
    ``kernel_mod.grad_slots`` (inside a custom op no tensor requires grad).
    """
    captures = tuple(captures)
    if check and kernel_mod.captures:
        old = [capture_spec(t, False) for t in kernel_mod.captures]
        new = [capture_spec(t, False) for t in captures]
        if old != new:
            raise ValueError(
                f"{kernel_mod.name}: the captured tensors changed kind since the mod was compiled "
                f"(dtype, rank or size class): {old} -> {new}"
            )
    args: list = []
    for tensor in captures:
        args += [tensor, *map(encode_int, (*tensor.shape, *tensor.stride()))]
    grad_captures = tuple(captures[s] for s in kernel_mod.grad_slots)
    return dataclasses.replace(
        kernel_mod,
        args=tuple(args),
        captures=captures,
        grad_captures=grad_captures,
        make_grad_args=_grad_args_builder(grad_captures) if kernel_mod.grad_fn is not None else None,
    )


def _grad_args_builder(grad_captures: tuple[torch.Tensor, ...]):
    shapes = [tuple(t.shape) for t in grad_captures]
    wide = [capture_spec(t, True).wide for t in grad_captures]

    def make_grad_args(buffers: tuple[torch.Tensor, ...]) -> tuple:
        if len(buffers) != len(shapes):
            raise ValueError(f"expected {len(shapes)} gradient buffers, got {len(buffers)}")
        args: list = []
        for buffer, shape, is_wide in zip(buffers, shapes, wide):
            if tuple(buffer.shape) != shape or buffer.dtype not in (torch.float32, torch.int64):
                raise ValueError(
                    f"gradient buffers must be float32 (or int64 fixed point) of shape {shape}, "
                    f"got {buffer.dtype} {tuple(buffer.shape)}"
                )
            if capture_spec(buffer, False).wide and not is_wide:
                raise ValueError(
                    f"gradient buffer strides {buffer.stride()} reach 2**31 elements; pass it contiguous"
                )
            args += [buffer, *map(encode_int, buffer.stride())]
        return tuple(args)

    return make_grad_args
