"""Flamingo-style cross-attention: text tokens attend only to the image tokens of "their" image.

Queries are text tokens (``Q_LEN`` of them), keys are the concatenated tokens of all images
(``KV_LEN``). Each image ``n`` owns a span of text positions ``[start_n, end_n)``; in Flamingo that
is from the image's ``<image>`` tag up to the next image's tag. A text token sees the keys of image
``n`` exactly when it lies in image ``n``'s span::

    from flexattn.variants import document_ids_from_lengths, flamingo_query_spans, image_cross_attention

    kv_image_ids = document_ids_from_lengths(torch.tensor([64, 64, 64]))   # 3 images, 64 tokens each
    spans = flamingo_query_spans(torch.tensor([0, 40, 300]), query_length=512)
    mask_mod = image_cross_attention(kv_image_ids, spans)
    block_mask = create_block_mask(mask_mod, None, None, 512, 192)

Text before the first image sees no key: its output is 0 (and its logsumexp -inf).
"""

from __future__ import annotations

import torch


def flamingo_query_spans(image_positions: torch.Tensor, query_length: int) -> torch.Tensor:
    """Text spans of each image: from its tag position to the next image's tag (or the end).

    Args:
        image_positions: int tensor ``(num_images,)``, strictly increasing text positions of the
            ``<image>`` tags.
        query_length: number of text tokens.

    Returns:
        int32 tensor ``(num_images, 2)`` of ``[start, end)`` text positions.

    Example:
        >>> flamingo_query_spans(torch.tensor([0, 5]), query_length=8)
        tensor([[0, 5],
                [5, 8]], dtype=torch.int32)
    """
    starts = torch.as_tensor(image_positions).to(torch.int32)
    if starts.ndim != 1 or starts.numel() == 0 or bool((starts[1:] <= starts[:-1]).any()):
        raise ValueError(f"image_positions must be a strictly increasing 1-D tensor, got {starts.tolist()}.")
    if int(starts[0]) < 0 or int(starts[-1]) >= query_length:
        raise ValueError(f"image_positions must lie in [0, {query_length}), got {starts.tolist()}.")
    ends = torch.cat([starts[1:], starts.new_tensor([query_length])])
    return torch.stack([starts, ends], dim=1)


def image_cross_attention(kv_image_ids: torch.Tensor, query_spans: torch.Tensor):
    """Mask mod for text-to-image cross-attention with one text span per image.

    Args:
        kv_image_ids: int tensor ``(KV_LEN,)``: the image each key token belongs to.
        query_spans: int tensor ``(num_images, 2)``: ``[start, end)`` of the text positions that
            attend to each image (see :func:`flamingo_query_spans`); spans may overlap or leave gaps.

    Returns:
        a mask mod named ``image_cross_attention``: ``q_idx`` in the span of ``kv_idx``'s image.
    """
    if kv_image_ids.ndim != 1 or query_spans.ndim != 2 or query_spans.shape[1] != 2:
        raise ValueError(
            f"expected kv_image_ids (KV_LEN,) and query_spans (num_images, 2), got "
            f"{tuple(kv_image_ids.shape)} and {tuple(query_spans.shape)}."
        )
    image_of_key = kv_image_ids.to(torch.int32)
    spans = query_spans.to(torch.int32)

    def image_cross_attention(b, h, q_idx, kv_idx):
        span = spans[image_of_key[kv_idx]]  # (2,): this key's image's [start, end)
        return (q_idx >= span[0]) & (q_idx < span[1])

    return image_cross_attention
