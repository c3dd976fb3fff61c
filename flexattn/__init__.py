"""flexattn: attention variants as small Python functions, compiled into fused block-sparse kernels.

A drop-in for ``torch.nn.attention.flex_attention``::

    from flexattn import flex_attention, create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, B=None, H=None, Q_LEN=1024, KV_LEN=1024, device="cpu")
    out = flex_attention(q, k, v, block_mask=mask)          # q, k, v: (B, H, L, E)
"""

from flexattn.api import AuxOutput, AuxRequest, flex_attention
from flexattn.block_mask import BlockMask, and_masks, create_block_mask, create_mask, noop_mask, or_masks
from flexattn.compiler import explain
from flexattn.options import KernelOptions

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockMask",
    "KernelOptions",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "explain",
    "flex_attention",
    "noop_mask",
    "or_masks",
]
__version__ = "0.1.0"
