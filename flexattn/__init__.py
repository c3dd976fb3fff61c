"""flexattn: attention variants as small Python functions, compiled into fused block-sparse kernels.

A drop-in for ``torch.nn.attention.flex_attention``::

    import torch
    from flexattn import flex_attention, create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = (torch.randn(1, 4, 1024, 64) for _ in range(3))          # (B, H, L, E)
    mask = create_block_mask(causal, B=None, H=None, Q_LEN=1024, KV_LEN=1024, device="cpu")
    out = flex_attention(q, k, v, block_mask=mask)

Importing the package is cheap: every public name is loaded on first access (PEP 562), so
``import flexattn`` and ``flexattn --help`` load neither Triton nor the mod compiler nor the kernels.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first access
    from flexattn.api import AuxOutput, AuxRequest, flex_attention
    from flexattn.block_mask import BlockMask, and_masks, create_block_mask, create_mask, noop_mask, or_masks
    from flexattn.compiler import explain
    from flexattn.kernels.positions import Positions
    from flexattn.options import FlexKernelOptions, KernelOptions

# public name -> the module that defines it (loaded on first access).
_PUBLIC = {
    "AuxOutput": "flexattn.api",
    "AuxRequest": "flexattn.api",
    "flex_attention": "flexattn.api",
    "BlockMask": "flexattn.block_mask",
    "and_masks": "flexattn.block_mask",
    "create_block_mask": "flexattn.block_mask",
    "create_mask": "flexattn.block_mask",
    "noop_mask": "flexattn.block_mask",
    "or_masks": "flexattn.block_mask",
    "explain": "flexattn.compiler",
    "FlexKernelOptions": "flexattn.options",
    "KernelOptions": "flexattn.options",
    "Positions": "flexattn.kernels.positions",
}
_SUBMODULES = ("compiler", "gallery", "variants")

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "FlexKernelOptions",
    "KernelOptions",
    "Positions",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "explain",
    "flex_attention",
    "noop_mask",
    "or_masks",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"flexattn.{name}")
    else:
        raise AttributeError(f"module 'flexattn' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
