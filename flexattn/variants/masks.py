"""Positional masks: causal, sliding window, prefix LM, dilated window, Longformer, chunked, StreamingLLM.

Every factory returns a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` with per-element semantics: each
argument is a 0-dim int32 tensor (``h`` is the query head; ``q_idx``/``kv_idx`` are absolute
positions), exactly as ``flex_attention`` and ``create_block_mask`` call it. Pass the mod to
``create_block_mask``; the kernels skip every block the mask rules out::

    from flexattn import create_block_mask, flex_attention
    from flexattn.variants import sliding_window

    mask = create_block_mask(sliding_window(256), B=None, H=None, Q_LEN=4096, KV_LEN=4096)
    out = flex_attention(q, k, v, block_mask=mask)        # q, k, v: (B, H, 4096, E)

Composite masks are built from small ones with ``and_masks`` / ``or_masks``, not with flags.
"""

from __future__ import annotations

import torch

from flexattn.block_mask import and_masks, or_masks


def causal():
    """Each query sees itself and every earlier key: ``kv_idx <= q_idx``.

    Example:
        >>> mask = create_block_mask(causal(), None, None, 1024, 1024)    # __name__ == "causal"
    """

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return causal


_causal = causal()


def _window(window_size: int):
    """Keys at distance at most ``window_size`` on either side."""

    def window(b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= window_size

    window.__name__ = f"window_{window_size}"
    return window


def sliding_window(window_size: int, causal: bool = True):
    """Local attention: each query sees the keys at most ``window_size`` positions away.

    With ``causal=True`` (the Mistral / Gemma layout) query ``i`` sees keys ``i - window_size .. i``,
    i.e. ``window_size + 1`` keys; with ``causal=False`` it also sees ``window_size`` keys ahead.

    Example:
        >>> mask_mod = sliding_window(1024)           # __name__ == "sliding_window_1024"
    """
    _check_positive("window_size", window_size, allow_zero=True)
    if causal:
        mod = and_masks(_causal, _window(window_size))
        mod.__name__ = f"sliding_window_{window_size}"
    else:
        mod = _window(window_size)
        mod.__name__ = f"bidirectional_window_{window_size}"
    return mod


def prefix_lm(prefix_length):
    """Prefix LM (T5 / PaliGemma): the first ``prefix_length`` keys are visible to every query,
    the rest of the sequence is causal.

    Args:
        prefix_length: a Python int shared by the batch, or an int tensor of shape ``(B,)`` with one
            prefix length per batch element (then build the BlockMask with that ``B``).

    Example:
        >>> mask_mod = prefix_lm(256)                 # __name__ == "prefix_lm_256"
        >>> mask_mod = prefix_lm(torch.tensor([100, 300], dtype=torch.int32))  # per batch element
    """
    if isinstance(prefix_length, torch.Tensor):
        if prefix_length.ndim != 1:
            raise ValueError(f"prefix_length tensor must have shape (B,), got {tuple(prefix_length.shape)}.")

        def prefix(b, h, q_idx, kv_idx):
            return kv_idx < prefix_length[b]

        name = "prefix_lm_per_batch"
    else:
        _check_positive("prefix_length", prefix_length, allow_zero=True)

        def prefix(b, h, q_idx, kv_idx):
            return kv_idx < prefix_length

        name = f"prefix_lm_{prefix_length}"
    mod = or_masks(prefix, _causal)
    mod.__name__ = name
    return mod


def dilated_sliding_window(window_size: int, dilation: int, causal: bool = True):
    """Dilated local attention (Longformer's dilated window): query ``i`` sees the keys at distances
    ``0, dilation, 2 * dilation, ..., window_size * dilation`` (and the mirrored ones when
    ``causal=False``), so ``window_size`` steps cover a ``dilation`` times wider span.

    Example:
        >>> mask_mod = dilated_sliding_window(64, dilation=4)   # "dilated_sliding_window_64x4"
    """
    _check_positive("window_size", window_size, allow_zero=True)
    _check_positive("dilation", dilation)

    def dilated_window(b, h, q_idx, kv_idx):
        distance = torch.abs(q_idx - kv_idx)
        return (distance <= window_size * dilation) & (distance % dilation == 0)

    if causal:
        mod = and_masks(_causal, dilated_window)
        mod.__name__ = f"dilated_sliding_window_{window_size}x{dilation}"
    else:
        mod = dilated_window
        mod.__name__ = f"dilated_window_{window_size}x{dilation}"
    return mod


def longformer(window_size: int, num_global: int):
    """Longformer's global + sliding attention (bidirectional): the first ``num_global`` tokens
    (e.g. [CLS] or question tokens) attend to everything and are attended by everything; every
    other pair attends when at most ``window_size`` positions apart.

    Example:
        >>> mask_mod = longformer(window_size=128, num_global=16)   # "longformer_128_g16"
    """
    _check_positive("window_size", window_size, allow_zero=True)
    _check_positive("num_global", num_global, allow_zero=True)

    def global_tokens(b, h, q_idx, kv_idx):
        return (q_idx < num_global) | (kv_idx < num_global)

    mod = or_masks(global_tokens, _window(window_size))
    mod.__name__ = f"longformer_{window_size}_g{num_global}"
    return mod


def chunked(chunk_size: int, causal: bool = False):
    """Block-diagonal attention: the sequence is cut into chunks of ``chunk_size`` and a query sees
    only keys of its own chunk. ``causal=True`` makes it causal inside each chunk (Llama 4's
    chunked local attention).

    Example:
        >>> mask_mod = chunked(512)                   # __name__ == "chunked_512"
    """
    _check_positive("chunk_size", chunk_size)

    def same_chunk(b, h, q_idx, kv_idx):
        return q_idx // chunk_size == kv_idx // chunk_size

    if causal:
        mod = and_masks(_causal, same_chunk)
        mod.__name__ = f"chunked_causal_{chunk_size}"
    else:
        mod = same_chunk
        mod.__name__ = f"chunked_{chunk_size}"
    return mod


def streaming_llm(num_sink_tokens: int, window_size: int):
    """StreamingLLM's attention-sink mask: causal, each query sees the first ``num_sink_tokens``
    keys (the sinks) plus a causal sliding window of ``window_size``.

    Example:
        >>> mask_mod = streaming_llm(4, 1024)         # __name__ == "streaming_llm_4_1024"
    """
    _check_positive("num_sink_tokens", num_sink_tokens, allow_zero=True)
    _check_positive("window_size", window_size, allow_zero=True)

    def sinks(b, h, q_idx, kv_idx):
        return kv_idx < num_sink_tokens

    mod = and_masks(_causal, or_masks(sinks, _window(window_size)))
    mod.__name__ = f"streaming_llm_{num_sink_tokens}_{window_size}"
    return mod


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    smallest = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
        raise ValueError(f"{name} must be an int >= {smallest}, got {value!r}.")
