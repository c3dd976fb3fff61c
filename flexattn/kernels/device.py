"""What the launchers ask of the GPU: its limits, tensor descriptors (TMA), the dot's precision.

:class:`DeviceLimits` is the target a launch is planned for; launchers read it from the tensors'
device by default and accept one explicitly, so tools compile for a GPU they do not have
(``benchmarks/compile_report.py``) and tests choose Hopper paths without patching anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cache

import torch
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class DeviceLimits:
    """A launch target. ``capability`` None: no GPU (Triton's interpreter)."""

    capability: tuple[int, int] | None = None
    shared_memory: int | None = None  # opt-in shared memory per block, bytes
    multiprocessors: int | None = None  # SM count (the decode kernel's key splits fill them)

    @property
    def hopper(self) -> bool:
        return self.capability is not None and self.capability[0] >= 9


@cache
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None) or 101376
    return DeviceLimits((props.major, props.minor), int(smem), int(props.multi_processor_count))


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of ``device`` (an empty DeviceLimits for CPU tensors)."""
    if device.type != "cuda":
        return DeviceLimits()
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


def tma_compatible(t: torch.Tensor, target: DeviceLimits) -> bool:
    """A tensor the kernels may read through Hopper tensor descriptors: on CUDA, the interpreter or
    an explicit GPU ``target``, with a unit feature stride and 16-byte aligned base and strides."""
    on_gpu = t.is_cuda or target.capability is not None or os.environ.get("TRITON_INTERPRET") == "1"
    size = t.element_size()
    aligned = t.data_ptr() % 16 == 0 and all([s * size % 16 == 0 for s in t.stride()[:-1]])
    return on_gpu and t.stride(-1) == 1 and aligned


def tile_descriptors(
    tensors: tuple[tuple[torch.Tensor, int], ...], rows: int, target: DeviceLimits, *, compatible=None
) -> tuple | None:
    """Tensor descriptors over 4-D (B, H, L, D) tensors, one per ``(tensor, width)`` pair, each
    loading ``[1, 1, rows, width]`` blocks (zero-padded past L and D); None when any of the tensors
    cannot be described (``tma_compatible``), so that the caller uses pointers for all of them.
    ``compatible``: that test's answer for all of them, when the caller has it already."""
    if compatible is None:
        compatible = all(tma_compatible(t, target) for t, _ in tensors)
    if not compatible:
        return None
    return tuple(descriptor(t, [1, 1, rows, width]) for t, width in tensors)


# TensorDescriptor's own checks: the tensor's (alignment, unit last stride, 16-byte strides) are
# tma_compatible's, a shape has no zero, and the block shape's depend on it alone. So a block shape
# that passed them once is not checked again (when the class is the plain dataclass of Triton 3.6).
_PLAIN_DESCRIPTOR = tuple(f.name for f in dataclasses.fields(TensorDescriptor)) == (
    "base", "shape", "strides", "block_shape", "padding",
)  # fmt: skip
_CHECKED_BLOCKS: set[tuple[int, ...]] = set()


def descriptor(t: torch.Tensor, block_shape: list[int], shape=None, strides=None) -> TensorDescriptor:
    """``TensorDescriptor(t, t.shape, t.stride(), block_shape)`` for a ``tma_compatible`` tensor.
    ``shape`` / ``strides``: ``list(t.shape)`` / ``list(t.stride())``, when the caller has them (a
    repeated launch, ``flexattn/call_cache.py``)."""
    shape = list(t.shape) if shape is None else shape
    strides = list(t.stride()) if strides is None else strides
    if _PLAIN_DESCRIPTOR and tuple(block_shape) in _CHECKED_BLOCKS and 0 not in shape:
        made = object.__new__(TensorDescriptor)
        made.__dict__.update(base=t, shape=shape, strides=strides, block_shape=block_shape, padding="zero")
        return made
    made = TensorDescriptor(t, shape, strides, block_shape)
    _CHECKED_BLOCKS.add(tuple(block_shape))
    return made


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 (as torch's matmuls do)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
