"""Packed sequences: several documents concatenated into one row, attention kept inside each document.

Build a document id per token (from the documents' lengths or from cu_seqlens-style offsets), then
wrap any inner mask so that it only applies within a document, seen from the document's own start::

    from flexattn.variants import causal, document_ids_from_lengths, document_mask

    doc_ids = document_ids_from_lengths(torch.tensor([300, 724, 1024]))       # (2048,) int32
    mask_mod = document_mask(doc_ids, causal())                               # "document_causal"
    block_mask = create_block_mask(mask_mod, None, None, 2048, 2048)
"""

from __future__ import annotations

import torch


def document_ids_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Document id of every token of a packed row, from the documents' lengths.

    Args:
        lengths: int tensor ``(num_docs,)``, each >= 1.

    Returns:
        int32 tensor ``(sum(lengths),)`` on ``lengths.device``: ``0`` for the first document's
        tokens, ``1`` for the second's, and so on.

    Example:
        >>> document_ids_from_lengths(torch.tensor([2, 3]))
        tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    """
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 1 or lengths.numel() == 0 or bool((lengths < 1).any()):
        raise ValueError(f"lengths must be a non-empty 1-D tensor of ints >= 1, got {lengths.tolist()}.")
    ids = torch.arange(lengths.numel(), device=lengths.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths.long())


def document_ids_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """Document id of every token of a packed row, from cumulative offsets (``cu_seqlens``).

    Args:
        offsets: int tensor ``(num_docs + 1,)``, strictly increasing, starting at 0; document ``d``
            occupies positions ``offsets[d] .. offsets[d + 1] - 1``.

    Example:
        >>> document_ids_from_offsets(torch.tensor([0, 2, 5]))
        tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    """
    offsets = torch.as_tensor(offsets)
    if offsets.ndim != 1 or offsets.numel() < 2 or int(offsets[0]) != 0:
        raise ValueError(f"offsets must be a 1-D tensor [0, ..., total], got {offsets.tolist()}.")
    return document_ids_from_lengths(offsets[1:] - offsets[:-1])


def document_offsets(document_ids: torch.Tensor, num_docs: int | None = None) -> torch.Tensor:
    """First position of every document: ``offsets[..., d]`` for ids ``(L,)`` or ``(B, L)``.

    Documents must be contiguous runs of the ids ``0 .. num_docs - 1``. The result has the ids'
    leading shape and ``num_docs`` columns (int32); absent ids get offset ``L``. ``num_docs``: at
    least the largest id + 1 (known from the packing, e.g. the number of documents per row), so no
    value is read back; None reads it from the ids (a host-device synchronisation on a GPU).
    """
    rows = document_ids.reshape(-1, document_ids.shape[-1]).long()  # (B or 1, L)
    if num_docs is None:
        num_docs = int(rows.max()) + 1
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
    offsets = torch.full((rows.shape[0], num_docs), rows.shape[-1], device=rows.device, dtype=torch.long)
    offsets.scatter_reduce_(1, rows, positions, reduce="amin")
    return offsets.to(torch.int32).reshape(*document_ids.shape[:-1], num_docs)


def document_mask(document_ids: torch.Tensor, inner=None, *, num_docs: int | None = None):
    """Attention restricted to each document of a packed sequence, optionally with an inner mask.

    ``inner(b, h, q_pos, kv_pos)`` is any mask mod; it sees positions *relative to the start of the
    document*, so ``prefix_lm(64)`` gives every document its own 64-token prefix and ``causal()``
    makes each document causal.

    Args:
        document_ids: int tensor ``(L,)`` shared by the batch, or ``(B, L)`` with one packing per
            batch element; documents are contiguous runs of ids ``0, 1, 2, ...`` (see
            :func:`document_ids_from_lengths`). Queries and keys share the packing (self-attention).
        inner: a mask mod, or None for full attention inside each document.
        num_docs: with ``inner``, at least the number of documents of any row (the largest id + 1),
            known from the packing: the documents' starts are then found without reading a value
            back from the device (see :func:`document_offsets`). None reads it from the ids.

    Returns:
        a mask mod named ``document`` or ``document_<inner name>``.

    Example:
        >>> ids = document_ids_from_lengths(torch.tensor([100, 412]))
        >>> mask = create_block_mask(document_mask(ids, causal()), None, None, 512, 512)
    """
    if document_ids.ndim not in (1, 2) or document_ids.dtype.is_floating_point:
        raise ValueError(
            f"document_ids must be an int tensor of shape (L,) or (B, L), got {document_ids.dtype} "
            f"{tuple(document_ids.shape)}."
        )
    ids = document_ids.to(torch.int32)
    offsets = None if inner is None else document_offsets(ids, num_docs)

    if ids.ndim == 1:

        def doc_of(b, idx):
            return ids[idx]

        def start_of(b, doc):
            return offsets[doc]

    else:

        def doc_of(b, idx):
            return ids[b, idx]

        def start_of(b, doc):
            return offsets[b, doc]

    if inner is None:

        def mod(b, h, q_idx, kv_idx):
            return doc_of(b, q_idx) == doc_of(b, kv_idx)

        mod.__name__ = "document"
    else:

        def mod(b, h, q_idx, kv_idx):
            q_doc = doc_of(b, q_idx)
            kv_doc = doc_of(b, kv_idx)
            q_pos = q_idx - start_of(b, q_doc)
            kv_pos = kv_idx - start_of(b, kv_doc)
            return (q_doc == kv_doc) & inner(b, h, q_pos, kv_pos)

        mod.__name__ = f"document_{getattr(inner, '__name__', 'mask')}"
    return mod
