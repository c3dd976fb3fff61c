"""The mod catalog every kernel and backend test runs through.

``CATALOG[id](B, H, Lq, Lkv, device)`` returns :class:`Mods` — ``(score_mod, mask_mod)`` (either may
be None; unpack it like a pair) plus ``params``, the float tensors the score_mod captures, which a
test may turn learnable with ``p.requires_grad_()`` (the mod sees the same tensor object).
``SCORE_MODS`` / ``MASK_MODS`` are the entries that only have a score_mod / only a mask_mod, as
factories returning that one mod. ``H`` is the number of *query* heads.

The catalog holds every factory exported by ``flexattn.variants`` plus the tricky cases: captured
tensors and scalars, gathers of gathers, gather-then-index rows, nested and_masks/or_masks, a
score_mod calling a mask, constant masks (fully masked rows), mods ignoring some of their inputs,
Python math, dtype casts. Factories draw their random content from torch's global RNG, which the
test session seeds freshly per test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexattn import and_masks, or_masks
from flexattn import variants as V


@dataclass
class Mods:
    """A catalog entry's mods and the float tensors its score_mod captures."""

    score_mod: Callable | None
    mask_mod: Callable | None
    params: tuple[torch.Tensor, ...] = ()

    def __iter__(self):
        return iter((self.score_mod, self.mask_mod))


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _random_lengths(total: int, max_docs: int) -> torch.Tensor:
    """Random document lengths (each >= 1) summing to ``total``."""
    docs = int(torch.randint(1, max(2, min(max_docs, total) + 1), ()))
    cuts = torch.randperm(total - 1)[: docs - 1] + 1 if docs > 1 else torch.zeros(0, dtype=torch.long)
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
    return bounds.diff()


def _doc_ids(L: int, device) -> torch.Tensor:
    return V.document_ids_from_lengths(_random_lengths(L, 5)).to(device)


# ---- entries built from flexattn.variants ------------------------------------------------------


def _v_causal(B, H, Lq, Lkv, device):
    return Mods(None, V.causal())


def _v_sliding_window(B, H, Lq, Lkv, device):
    return Mods(None, V.sliding_window(max(1, Lkv // 5)))


def _v_bidirectional_window(B, H, Lq, Lkv, device):
    return Mods(None, V.sliding_window(max(1, Lkv // 7), causal=False))


def _v_prefix_lm(B, H, Lq, Lkv, device):
    return Mods(None, V.prefix_lm(max(1, Lkv // 4)))


def _v_prefix_lm_per_batch(B, H, Lq, Lkv, device):
    return Mods(None, V.prefix_lm(torch.randint(0, Lkv + 1, (B,), dtype=torch.int32, device=device)))


def _v_dilated_window(B, H, Lq, Lkv, device):
    return Mods(None, V.dilated_sliding_window(3, 2))


def _v_longformer(B, H, Lq, Lkv, device):
    return Mods(None, V.longformer(max(1, Lkv // 8), 2))


def _v_chunked(B, H, Lq, Lkv, device):
    return Mods(None, V.chunked(max(1, Lkv // 3)))


def _v_chunked_causal(B, H, Lq, Lkv, device):
    return Mods(None, V.chunked(max(1, Lkv // 3), causal=True))


def _v_streaming_llm(B, H, Lq, Lkv, device):
    return Mods(None, V.streaming_llm(2, max(1, Lkv // 6)))


def _v_document(B, H, Lq, Lkv, device):
    return Mods(None, V.document_mask(_doc_ids(max(Lq, Lkv), device)))


def _v_document_causal(B, H, Lq, Lkv, device):
    return Mods(None, V.document_mask(_doc_ids(max(Lq, Lkv), device), V.causal()))


def _v_document_per_batch(B, H, Lq, Lkv, device):
    L = max(Lq, Lkv)
    ids = torch.stack([_doc_ids(L, device) for _ in range(B)])
    return Mods(None, V.document_mask(ids, V.prefix_lm(2)))


def _v_natten_1d(B, H, Lq, Lkv, device):
    L = max(Lq, Lkv)
    return Mods(None, V.natten_1d(L, max(1, min(L, 5))))


def _v_natten_2d(B, H, Lq, Lkv, device):
    L = max(Lq, Lkv)
    width = math.isqrt(L - 1) + 1
    height = -(-L // width)
    return Mods(None, V.natten_2d(height, width, (min(3, height), min(3, width))))


def _v_image_cross_attention(B, H, Lq, Lkv, device):
    images = max(1, min(4, Lkv // 3, Lq))
    image_of_key = torch.sort(torch.randint(0, images, (Lkv,))).values.to(device)
    tags = torch.sort(torch.randperm(Lq)[:images]).values
    spans = V.flamingo_query_spans(tags, Lq).to(device)
    return Mods(None, V.image_cross_attention(image_of_key, spans))


def _v_alibi(B, H, Lq, Lkv, device):
    return Mods(V.alibi(H, device=device), None)


def _v_alibi_causal(B, H, Lq, Lkv, device):
    return Mods(V.alibi(H, device=device), V.causal())


def _v_tanh_softcap(B, H, Lq, Lkv, device):
    return Mods(V.tanh_softcap(2.0), None)


def _v_t5_relative_bias(B, H, Lq, Lkv, device):
    table = torch.randn(16, H, device=device)
    return Mods(V.t5_relative_bias(table, max_distance=20), None, (table,))


def _v_learned_sink(B, H, Lq, Lkv, device):
    sinks = torch.randn(H, device=device)
    return Mods(V.learned_sink(sinks), V.with_sink_slot(V.causal()), (sinks,))


# ---- inline entries: the tricky cases ----------------------------------------------------------


def _noop(B, H, Lq, Lkv, device):
    return Mods(None, None)


def _causal_inline(B, H, Lq, Lkv, device):
    return Mods(None, _causal)


def _causal_bottom_right(B, H, Lq, Lkv, device):
    offset = Lkv - Lq

    def causal_bottom_right(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return Mods(None, causal_bottom_right)


def _relative_bias_table(B, H, Lq, Lkv, device):
    bias = torch.randn(Lq + Lkv, device=device)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx - kv_idx + Lkv]

    return Mods(relative_bias, None, (bias,))


def _per_head_query_temperature_causal(B, H, Lq, Lkv, device):
    # A temperature per (head, query row), not a bias: a bias constant along a row cancels in the
    # softmax, so its gradient is zero up to rounding and no relative error bound can judge it.
    temperature = 1 + 0.25 * torch.randn(H, Lq, device=device)

    def head_query_temperature(score, b, h, q_idx, kv_idx):
        return score * temperature[h, q_idx]

    return Mods(head_query_temperature, _causal, (temperature,))


def _captured_scalar(B, H, Lq, Lkv, device):
    temperature = torch.rand((), device=device) + 0.5

    def temperature_scale(score, b, h, q_idx, kv_idx):
        return score * temperature

    return Mods(temperature_scale, None, (temperature,))


def _gather_of_gather(B, H, Lq, Lkv, device):
    doc_id = _doc_ids(max(Lq, Lkv), device)
    offsets = V.document_offsets(doc_id)

    def same_doc_causal_by_offsets(b, h, q_idx, kv_idx):
        return (kv_idx >= offsets[doc_id[q_idx]]) & (kv_idx <= q_idx)

    return Mods(None, same_doc_causal_by_offsets)


def _interval_gather_then_index(B, H, Lq, Lkv, device):
    images = max(1, min(3, Lkv))
    img = torch.randint(0, images, (Lkv,), device=device)
    starts = torch.randint(0, Lq, (images,))
    ends = starts + torch.randint(1, Lq + 1, (images,))
    intervals = torch.stack([starts, ends], dim=1).to(device)

    def interval_mask(b, h, q_idx, kv_idx):
        iv = intervals[img[kv_idx]]
        return (q_idx >= iv[0]) & (q_idx < iv[1])

    return Mods(None, interval_mask)


def _nested_and_or(B, H, Lq, Lkv, device):
    window = max(1, Lkv // 4)

    def near(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window

    def first_keys(b, h, q_idx, kv_idx):
        return kv_idx < 3

    def odd_heads_all(b, h, q_idx, kv_idx):
        return h % 2 == 1

    return Mods(None, or_masks(and_masks(_causal, near), and_masks(first_keys, _causal), odd_heads_all))


def _score_calls_mask(B, H, Lq, Lkv, device):
    def masked_by_score(score, b, h, q_idx, kv_idx):
        return torch.where(_causal(b, h, q_idx, kv_idx), score, -float("inf"))

    return Mods(masked_by_score, None)


def _constant_false(B, H, Lq, Lkv, device):
    def nothing(b, h, q_idx, kv_idx):
        return b.new_zeros((), dtype=torch.bool)

    return Mods(None, nothing)


def _late_rows_only(B, H, Lq, Lkv, device):
    first = Lq // 3

    def late_rows(b, h, q_idx, kv_idx):
        return (q_idx >= first) & (kv_idx <= q_idx)

    return Mods(None, late_rows)


def _kv_only_mask(B, H, Lq, Lkv, device):
    def every_third_key_hidden(b, h, q_idx, kv_idx):
        return kv_idx % 3 != 1

    return Mods(None, every_third_key_hidden)


def _batch_head_score(B, H, Lq, Lkv, device):
    def batch_head_offset(score, b, h, q_idx, kv_idx):
        return score + 0.25 * b - 0.5 * h

    return Mods(batch_head_offset, None)


def _score_ignores_score(B, H, Lq, Lkv, device):
    def distance_only(score, b, h, q_idx, kv_idx):
        return -0.1 * (q_idx - kv_idx).abs().to(torch.float32)

    return Mods(distance_only, None)


def _per_batch_head_window(B, H, Lq, Lkv, device):
    def head_window(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= 3 * (h + 1)) & ((b == 0) | (kv_idx % 2 == 0))

    return Mods(None, head_window)


def _math_ops(B, H, Lq, Lkv, device):
    def math_mix(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).to(torch.float32)
        bumps = torch.sigmoid(d / 8) - 0.1 * torch.sqrt(torch.abs(d) + 1) + torch.floor(d / 5) * 0.01
        return torch.clamp(score, -4.0, 4.0) + bumps + torch.exp(-torch.abs(d)) * torch.log1p(d.abs())

    return Mods(math_mix, None)


def _softcap_document_causal(B, H, Lq, Lkv, device):
    return Mods(V.tanh_softcap(3.0), V.document_mask(_doc_ids(max(Lq, Lkv), device), V.causal()))


CATALOG: dict[str, Callable[..., Mods]] = {
    "noop": _noop,
    "causal": _causal_inline,
    "causal-bottom-right": _causal_bottom_right,
    "v-causal": _v_causal,
    "v-sliding-window": _v_sliding_window,
    "v-bidirectional-window": _v_bidirectional_window,
    "v-prefix-lm": _v_prefix_lm,
    "v-prefix-lm-per-batch": _v_prefix_lm_per_batch,
    "v-dilated-window": _v_dilated_window,
    "v-longformer": _v_longformer,
    "v-chunked": _v_chunked,
    "v-chunked-causal": _v_chunked_causal,
    "v-streaming-llm": _v_streaming_llm,
    "v-document": _v_document,
    "v-document-causal": _v_document_causal,
    "v-document-per-batch-prefix": _v_document_per_batch,
    "v-natten-1d": _v_natten_1d,
    "v-natten-2d": _v_natten_2d,
    "v-image-cross-attention": _v_image_cross_attention,
    "v-alibi": _v_alibi,
    "v-alibi-causal": _v_alibi_causal,
    "v-tanh-softcap": _v_tanh_softcap,
    "v-t5-relative-bias": _v_t5_relative_bias,
    "v-learned-sink": _v_learned_sink,
    "relative-bias-table": _relative_bias_table,
    "head-query-temperature-causal": _per_head_query_temperature_causal,
    "captured-scalar": _captured_scalar,
    "gather-of-gather": _gather_of_gather,
    "interval-gather-then-index": _interval_gather_then_index,
    "nested-and-or": _nested_and_or,
    "score-calls-mask": _score_calls_mask,
    "constant-false": _constant_false,
    "late-rows-only": _late_rows_only,
    "kv-only-mask": _kv_only_mask,
    "batch-head-score": _batch_head_score,
    "score-ignores-score": _score_ignores_score,
    "per-batch-head-window": _per_batch_head_window,
    "math-ops": _math_ops,
    "softcap-document-causal": _softcap_document_causal,
}


def _only(entry: Callable[..., Mods], field: str) -> Callable:
    def factory(B, H, Lq, Lkv, device):
        return getattr(entry(B, H, Lq, Lkv, device), field)

    return factory


SCORE_MODS: dict[str, Callable] = {}
MASK_MODS: dict[str, Callable] = {}
for _name, _entry in CATALOG.items():
    _mods = _entry(2, 2, 8, 8, "cpu")
    if _mods.mask_mod is None and _mods.score_mod is not None:
        SCORE_MODS[_name] = _only(_entry, "score_mod")
    if _mods.score_mod is None and _mods.mask_mod is not None:
        MASK_MODS[_name] = _only(_entry, "mask_mod")
