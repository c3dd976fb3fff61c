"""Ready-made attention variants: one small factory per variant, each returning a mod.

Mask mods (``mask_mod(b, h, q_idx, kv_idx) -> bool``, for ``create_block_mask``):
    causal, sliding_window, prefix_lm, dilated_sliding_window, longformer, chunked, streaming_llm,
    document_mask (packed sequences, wraps an inner mask), natten_1d, natten_2d,
    image_cross_attention (Flamingo-style), with_sink_slot.

Score mods (``score_mod(score, b, h, q_idx, kv_idx) -> score``, for ``flex_attention``):
    alibi, tanh_softcap, t5_relative_bias (learnable table), learned_sink (learnable per-head sink).

Helpers building the tensors those mods capture:
    document_ids_from_lengths, document_ids_from_offsets, document_offsets, flamingo_query_spans,
    alibi_slopes, t5_buckets, prepend_sink_slot.

Every mod has a meaningful ``__name__`` (``sliding_window_256``, ``document_causal``, ...), uses plain
PyTorch with per-element semantics, and runs unchanged eagerly, on the reference backend and in the
Triton kernels. Example::

    from flexattn import create_block_mask, flex_attention
    from flexattn.variants import alibi, sliding_window

    mask = create_block_mask(sliding_window(256), None, None, 4096, 4096, device="cuda")
    out = flex_attention(q, k, v, score_mod=alibi(16, device="cuda"), block_mask=mask)
"""

from flexattn.variants.cross_attention import flamingo_query_spans, image_cross_attention
from flexattn.variants.documents import (
    document_ids_from_lengths,
    document_ids_from_offsets,
    document_mask,
    document_offsets,
)
from flexattn.variants.masks import (
    causal,
    chunked,
    dilated_sliding_window,
    longformer,
    prefix_lm,
    sliding_window,
    streaming_llm,
)
from flexattn.variants.natten import natten_1d, natten_2d
from flexattn.variants.scores import (
    alibi,
    alibi_slopes,
    learned_sink,
    prepend_sink_slot,
    t5_buckets,
    t5_relative_bias,
    tanh_softcap,
    with_sink_slot,
)

__all__ = [
    "alibi",
    "alibi_slopes",
    "causal",
    "chunked",
    "dilated_sliding_window",
    "document_ids_from_lengths",
    "document_ids_from_offsets",
    "document_mask",
    "document_offsets",
    "flamingo_query_spans",
    "image_cross_attention",
    "learned_sink",
    "longformer",
    "natten_1d",
    "natten_2d",
    "prefix_lm",
    "prepend_sink_slot",
    "sliding_window",
    "streaming_llm",
    "t5_buckets",
    "t5_relative_bias",
    "tanh_softcap",
    "with_sink_slot",
]
