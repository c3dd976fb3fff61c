"""Score mods: ALiBi, tanh soft-capping, T5 relative bias (learnable), learned attention sinks.

Every factory returns a ``score_mod(score, b, h, q_idx, kv_idx) -> score`` with per-element
semantics: ``score`` is a 0-dim fp32 tensor (the scaled ``q . k``), the indices are 0-dim int32
tensors, exactly as ``flex_attention`` calls it. Captured tensors that require grad (the T5 table,
the sink logits) receive gradients::

    from flexattn import flex_attention
    from flexattn.variants import alibi

    out = flex_attention(q, k, v, score_mod=alibi(num_heads=16))   # q, k, v: (B, 16, L, E)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes ``(num_heads,)`` fp32, as in Press et al. (2022).

    For a power-of-two head count: ``2 ** (-8 * (h + 1) / num_heads)``; otherwise the slopes of the
    next lower power of two followed by every other slope of twice that count.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}.")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi(num_heads: int, device=None):
    """ALiBi: a linear bias ``slope[h] * (kv_idx - q_idx)`` (negative for earlier keys).

    Args:
        num_heads: number of query heads (the slopes are per query head).
        device: where the captured slopes live; must be the device of ``q``.

    Example:
        >>> score_mod = alibi(16, device="cuda")          # __name__ == "alibi"
    """
    slopes = alibi_slopes(num_heads, device=device)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


def tanh_softcap(cap: float, approx: bool = False):
    """Tanh soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``, squashing logits into
    ``(-cap, cap)``.

    Args:
        cap: the cap, > 0 (Gemma 2 uses 50 for attention logits).
        approx: use :func:`flexattn.compiler.fast_tanh`: ``torch.tanh`` when run eagerly or on the
            reference backend, the GPU's ``tanh.approx.f32`` instruction inside the Triton kernels
            (relative error about 2**-11, well below bf16's resolution, and much faster).

    Example:
        >>> score_mod = tanh_softcap(30.0)                # __name__ == "tanh_softcap_30"
        >>> score_mod = tanh_softcap(30.0, approx=True)   # __name__ == "tanh_softcap_approx_30"
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}.")
    if approx:
        from flexattn.compiler import fast_tanh  # the compiler loads on first use, not at import

    tanh = fast_tanh if approx else torch.tanh

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * tanh(score / cap)

    softcap.__name__ = f"tanh_softcap_{'approx_' if approx else ''}{cap:g}"
    return softcap


def t5_buckets(num_buckets: int, max_distance: int, bidirectional: bool, device=None) -> torch.Tensor:
    """T5's bucket of every relative position ``kv_idx - q_idx`` in ``[-max_distance, max_distance]``.

    Half the buckets (per direction when ``bidirectional``) hold exact small distances; the other
    half cover distances up to ``max_distance`` logarithmically; farther ones share the last bucket,
    so clamping a relative position to ``+-max_distance`` does not change its bucket.

    Returns:
        int32 ``(2 * max_distance + 1,)``; entry ``r + max_distance`` is the bucket of position ``r``.
        Computed once here with T5's fp32 formula, so every backend gathers identical buckets.
    """
    relative_position = torch.arange(-max_distance, max_distance + 1)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    bucket = bucket + torch.where(distance < max_exact, distance, far)
    return bucket.to(dtype=torch.int32, device=device)


def t5_relative_bias(table: torch.Tensor, max_distance: int = 128, bidirectional: bool = True):
    """T5 relative position bias: ``score + table[bucket(kv_idx - q_idx), h]`` with a learnable table.

    Args:
        table: ``(num_buckets, num_heads)`` fp32 tensor, usually an ``nn.Parameter`` (it receives
            gradients through ``flex_attention``); ``num_buckets >= 4`` (>= 8 if bidirectional).
        max_distance: distance from which every key shares the last bucket (T5 uses 128).
        bidirectional: separate buckets for keys before and after the query (encoder); False for
            causal decoders.

    Example:
        >>> table = torch.nn.Parameter(torch.zeros(32, 8, device="cuda"))
        >>> out = flex_attention(q, k, v, score_mod=t5_relative_bias(table))
        >>> out.sum().backward()                          # table.grad: (32, 8)
    """
    num_buckets = table.shape[0] if table.ndim == 2 else 0
    min_buckets = 8 if bidirectional else 4
    if table.ndim != 2 or num_buckets < min_buckets:
        raise ValueError(
            f"table must be (num_buckets >= {min_buckets}, num_heads), got {tuple(table.shape)}."
        )
    max_exact = num_buckets // (4 if bidirectional else 2)
    if not isinstance(max_distance, int) or max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be an int > {max_exact} (the exact buckets' range), got {max_distance!r}."
        )
    bucket_of = t5_buckets(num_buckets, max_distance, bidirectional, device=table.device)

    def t5_relative_bias(score, b, h, q_idx, kv_idx):
        relative_position = torch.clamp(kv_idx - q_idx, -max_distance, max_distance)
        return score + table[bucket_of[relative_position + max_distance], h]

    return t5_relative_bias


def learned_sink(sink_logits: torch.Tensor):
    """Learned attention sinks (gpt-oss style) through the score path.

    A sink is an extra logit per head that joins the softmax but contributes no value. Expressed
    with flex_attention: prepend one all-zero key/value slot (:func:`prepend_sink_slot`) and let this
    score mod replace that slot's score with ``sink_logits[h]``. Masks must keep slot 0 visible and
    see the real keys shifted by one: wrap them with :func:`with_sink_slot`.

    Args:
        sink_logits: ``(num_heads,)`` fp32, usually an ``nn.Parameter``.

    Example:
        >>> sinks = torch.nn.Parameter(torch.zeros(H))
        >>> k1, v1 = prepend_sink_slot(k, v)              # (B, H, L + 1, E)
        >>> mask = create_block_mask(with_sink_slot(causal()), None, None, L, L + 1)
        >>> out = flex_attention(q, k1, v1, score_mod=learned_sink(sinks), block_mask=mask)
    """
    if sink_logits.ndim != 1:
        raise ValueError(f"sink_logits must be (num_heads,), got {tuple(sink_logits.shape)}.")

    def learned_sink(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == 0, sink_logits[h], score)

    return learned_sink


def prepend_sink_slot(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend one all-zero token to ``key`` and ``value`` ``(B, H, L, E)`` -> ``(B, H, L + 1, E)``."""
    return F.pad(key, (0, 0, 1, 0)), F.pad(value, (0, 0, 1, 0))


def with_sink_slot(inner):
    """Mask mod for keys laid out as ``[sink slot, real keys...]``: slot 0 is always visible, and
    ``inner`` decides about the real key ``kv_idx - 1``.

    Example:
        >>> mask_mod = with_sink_slot(causal())           # __name__ == "sink_slot_causal"
    """

    def mod(b, h, q_idx, kv_idx):
        real_kv = torch.clamp(kv_idx - 1, min=0)  # clamped so gathers in `inner` stay in bounds
        return (kv_idx == 0) | inner(b, h, q_idx, real_kv)

    mod.__name__ = f"sink_slot_{getattr(inner, '__name__', 'mask')}"
    return mod
