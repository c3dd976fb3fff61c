"""The split-KV decode kernel (``flex_decode``) against the float64 reference and the prefill kernel.

The decode kernel's queries are the last ``Lq`` tokens of each sequence (``Positions.q_offset``); its
block mask is built for the whole sequence. The gold result is the reference over the *whole*
sequence (every query row present, positions implicit), sliced to those rows: it shares no code
with the positions path of the reference or the kernel. On CPU through Triton's interpreter
(TRITON_INTERPRET=1, fp32/fp16, tiny shapes); ``test_decode_gpu.py`` has the real sizes in bf16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flexattn import create_block_mask, noop_mask
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.decode import flex_decode
from flexattn.kernels.forward import flex_forward
from flexattn.kernels.kernel_choice import DecodeTiles
from flexattn.kernels.positions import Positions
from flexattn.reference import reference_attention
from tests.catalog import CATALOG
from tests.helpers import assert_close_to_gold

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _sliding(window):
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return sliding_window


def _mods(variant: str, B: int, Hq: int, L: int):
    """(score_mod, mask_mod) over positions 0..L-1 of the whole sequence."""
    if variant == "noop":
        return None, None
    if variant == "causal":
        return None, _causal
    if variant == "alibi-causal":
        slopes = torch.rand(Hq) * 0.5
        return (lambda s, b, h, q, kv: s + slopes[h] * (kv - q)), _causal
    if variant == "bias":  # a captured (B, Hq, L, L) tensor, gathered per (b, h, q, kv)
        bias = torch.randn(B, Hq, L, L)
        return (lambda s, b, h, q, kv: s + bias[b, h, q, kv]), None
    if variant == "sliding":
        return None, _sliding(max(1, L // 3))
    raise KeyError(variant)


def _whole_sequence(q, lengths, L):
    """Query rows placed at the end of each sequence of a zero (B, Hq, L, E) tensor, and the rows' index."""
    B, Hq, Lq, E = q.shape
    full = torch.zeros(B, Hq, L, E, dtype=q.dtype)
    for b, n in enumerate(lengths):
        full[b, :, n - Lq : n] = q[b]
    return full


def _gold_and_eager(q, k, v, score_mod, mask, scale, lengths):
    """Reference (float64 and test dtype) of every sequence in full, sliced to its last Lq rows."""
    B, Hq, Lq, _ = q.shape
    L = k.shape[2]
    results = []
    for compute in (None, q.dtype):
        outs, lses = [], []
        for b, n in enumerate(lengths):
            qb, kb, vb = (t[b : b + 1] for t in (_whole_sequence(q, lengths, L), k, v))
            mask_b = mask
            if n < L:  # a shorter sequence: its keys only (the mask rebuilt for its length)
                kb, vb, qb = kb[:, :, :n], vb[:, :, :n], qb[:, :, :n]
                if mask is not None:
                    mask_b = create_block_mask(
                        mask.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=mask.BLOCK_SIZE
                    )
            mod_b = _in_batch(score_mod, b)
            args = [t.double() if compute is None else t for t in (qb, kb, vb)]
            out, lse, _ = reference_attention(*args, mod_b, mask_b, scale, compute_dtype=compute)
            outs.append(out[:, :, n - Lq : n])
            lses.append(lse[:, :, n - Lq : n])
        results.append((torch.cat(outs), torch.cat(lses)))
    return results


def _in_batch(score_mod, batch):
    if score_mod is None:
        return None
    return lambda s, b, h, q, kv: score_mod(s, b + batch, h, q, kv)


def run_decode(
    B,
    Hq,
    Hkv,
    Lq,
    L,
    E,
    variant,
    dtype=torch.float32,
    blocks=(16, 16),
    lengths=None,
    splits=None,
    tiles=None,
    merge="FUSED",
):
    """flex_decode of the last Lq tokens of each sequence vs the whole-sequence reference; ``merge``:
    the splits merged in the split kernel's launch (FUSED, the default) or by the merge kernel
    (KERNEL; test_decode_fused_merge.py runs both on the same inputs)."""
    lengths = [L] * B if lengths is None else lengths
    q = torch.randn(B, Hq, Lq, E).to(dtype)
    k = torch.randn(B, Hkv, L, E).to(dtype)
    v = torch.randn(B, Hkv, L, E).to(dtype)
    score_mod, mask_mod = _mods(variant, B, Hq, L)
    mask = None
    if mask_mod is not None:
        mask = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=blocks)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    positions = Positions(q_offset=lengths_t - Lq, kv_lengths=None if lengths == [L] * B else lengths_t)
    scale = 0.8 / math.sqrt(E)
    out, lse, max_scores = flex_decode(
        q,
        k,
        v,
        score_mod=compile_score_mod(score_mod),
        mask_mod=compile_mask_mod(mask_mod),
        tables=None if mask is None else mask.tables(),
        scale=scale,
        positions=positions,
        splits=splits,
        tiles=tiles,
        merge=merge,
    )
    assert out.shape == (B, Hq, Lq, E) and out.dtype == dtype and lse.shape == max_scores.shape == (B, Hq, Lq)
    (gold_out, gold_lse), (eager_out, eager_lse) = _gold_and_eager(q, k, v, score_mod, mask, scale, lengths)
    assert_close_to_gold(out, gold_out, eager_out, name="out")
    assert_close_to_gold(lse, gold_lse, eager_lse, name="lse")
    return q, k, v, out, lse, max_scores


# Lq 1/4/8/16, GQA groups 1/4/8, head dims 16/64/128, KV lengths 1/17/97/300+ and the variants, each
# value in a few combinations (the full product would cost minutes in the interpreter).
CASES = [
    # (B, Hq, Hkv, Lq, L, E, variant, blocks)
    (2, 4, 1, 1, 97, 16, "causal", (16, 16)),
    (1, 8, 1, 4, 300, 16, "alibi-causal", (32, 32)),
    (2, 4, 4, 8, 17, 64, "bias", (16, 16)),
    (1, 8, 2, 16, 97, 16, "sliding", (16, 32)),
    (1, 8, 8, 1, 17, 128, "alibi-causal", (16, 16)),
    (2, 2, 2, 4, 300, 16, "noop", (16, 16)),
    (1, 4, 1, 16, 33, 64, "causal", (16, 16)),
    (1, 2, 2, 1, 1, 16, "noop", (16, 16)),
    (1, 3, 1, 5, 41, 16, "alibi-causal", (16, 16)),  # a group of 3 heads (not a power of two)
]


@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, L, E, variant, blocks",
    CASES,
    ids=[f"B{c[0]}-H{c[1]}/{c[2]}-Lq{c[3]}-L{c[4]}-E{c[5]}-{c[6]}-blk{c[7][0]}x{c[7][1]}" for c in CASES],
)
def test_decode_matches_reference(B, Hq, Hkv, Lq, L, E, variant, blocks):
    run_decode(B, Hq, Hkv, Lq, L, E, variant, blocks=blocks)


def test_fp16_inputs():
    run_decode(1, 4, 1, 4, 97, 64, "alibi-causal", dtype=torch.float16)


@pytest.mark.parametrize(
    "entry",
    [
        "v-document-causal",
        "v-prefix-lm-per-batch",
        "relative-bias-table",
        "late-rows-only",
        "nested-and-or",
        "v-streaming-llm",
    ],
)
def test_catalog_entries(entry):
    """Catalog mods (captured tensors, per-batch masks, gathers) through the block-sparse walk."""
    B, Hq, Hkv, Lq, L, E = 2, 4, 2, 3, 50, 16
    score_mod, mask_mod = CATALOG[entry](B, Hq, L, L, "cpu")
    q, k, v = torch.randn(B, Hq, Lq, E), torch.randn(B, Hkv, L, E), torch.randn(B, Hkv, L, E)
    mask = create_block_mask(mask_mod or noop_mask, B, None, L, L, device="cpu", BLOCK_SIZE=16)
    out, lse, _ = flex_decode(
        q,
        k,
        v,
        score_mod=compile_score_mod(score_mod),
        mask_mod=compile_mask_mod(mask_mod),
        tables=mask.tables(),
        scale=0.3,
        positions=Positions(q_offset=L - Lq),
    )
    full = _whole_sequence(q, [L] * B, L)
    gold = reference_attention(full.double(), k.double(), v.double(), score_mod, mask, 0.3)
    eager = reference_attention(full, k, v, score_mod, mask, 0.3)
    assert_close_to_gold(out, gold[0][:, :, L - Lq :], eager[0][:, :, L - Lq :], name="out")
    assert_close_to_gold(lse, gold[1][:, :, L - Lq :], eager[1][:, :, L - Lq :], name="lse")


def test_equals_prefill_kernel_without_positions():
    """Plain decoding (tokens at 0..Lq-1, no mask): the decode and prefill kernels agree."""
    q, k, v = torch.randn(2, 4, 4, 32), torch.randn(2, 2, 50, 32), torch.randn(2, 2, 50, 32)
    mask = create_block_mask(
        lambda b, h, i, j: j <= 3 * i + 30, None, None, 4, 50, device="cpu", BLOCK_SIZE=16
    )
    score, keep = compile_score_mod(lambda s, b, h, i, j: s * 0.5 + 0.01 * h), compile_mask_mod(mask.mask_mod)
    args = dict(score_mod=score, mask_mod=keep, tables=mask.tables(), scale=0.2)
    decoded = flex_decode(q, k, v, **args, splits=3)
    prefilled = flex_forward(q, k, v, **args)
    for name, a, b in zip(("out", "lse", "max_scores"), decoded, prefilled):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)


def test_ragged_batch_equals_per_sequence_runs():
    """Sequences of 5, 60 and 17 keys in one padded batch: each gives what it gives alone (and the
    reference); the mods see each sequence's own batch index."""
    lengths, Lq, L = [5, 60, 17], 4, 60
    q, k, v = torch.randn(3, 4, Lq, 16), torch.randn(3, 2, L, 16), torch.randn(3, 2, L, 16)
    slopes = torch.rand(4)

    def alibi(s, b, h, i, j):
        return s + slopes[h] * (j - i) + 0.5 * b

    mask = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=(16, 32))
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    positions = Positions(q_offset=lengths_t - Lq, kv_lengths=lengths_t)
    common = dict(mask_mod=compile_mask_mod(_causal), scale=0.25)
    batch = flex_decode(
        q,
        k,
        v,
        score_mod=compile_score_mod(alibi),
        tables=mask.tables(),
        positions=positions,
        splits=4,
        **common,
    )
    (gold_out, gold_lse), (eager_out, eager_lse) = _gold_and_eager(q, k, v, alibi, mask, 0.25, lengths)
    assert_close_to_gold(batch[0], gold_out, eager_out, name="out")
    assert_close_to_gold(batch[1], gold_lse, eager_lse, name="lse")
    for b, n in enumerate(lengths):
        alone_mask = create_block_mask(_causal, None, None, n, n, device="cpu", BLOCK_SIZE=(16, 32))
        alone = flex_decode(
            q[b : b + 1],
            k[b : b + 1, :, :n],
            v[b : b + 1, :, :n],
            score_mod=compile_score_mod(_in_batch(alibi, b)),
            tables=alone_mask.tables(),
            positions=Positions(q_offset=n - Lq),
            splits=2,
            **common,
        )
        for name, x, y in zip(("out", "lse", "max_scores"), batch, alone):
            torch.testing.assert_close(x[b : b + 1], y, atol=1e-5, rtol=1e-5, msg=f"{name} of sequence {b}")


def test_split_merge_is_exact():
    """Any number of key splits gives the single-split result up to rounding (max_scores exactly)."""
    q, k, v, *one = run_decode(1, 4, 1, 2, 130, 16, "noop", splits=1)
    args = dict(
        score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(None), tables=None, scale=0.8 / 4
    )
    positions = Positions(q_offset=128)
    for splits in (2, 3, 7, 100):
        out, lse, mx = flex_decode(q, k, v, positions=positions, splits=splits, **args)
        torch.testing.assert_close(out, one[0], atol=1e-5, rtol=1e-5, msg=f"out with {splits} splits")
        torch.testing.assert_close(lse, one[1], atol=1e-5, rtol=1e-5, msg=f"lse with {splits} splits")
        assert torch.equal(mx, one[2]), f"max_scores with {splits} splits"


def test_fully_masked_rows_and_empty_sequences():
    """Rows with no allowed key and sequences with no keys: out 0, lse = max = -inf, never NaN."""
    B, Hq, Lq, L = 3, 4, 4, 40

    def odd_rows(b, h, q_idx, kv_idx):
        return (q_idx % 2 == 1) & (kv_idx <= q_idx)

    q, k, v = torch.randn(B, Hq, Lq, 16), torch.randn(B, 2, L, 16), torch.randn(B, 2, L, 16)
    mask = create_block_mask(odd_rows, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    lengths = torch.tensor([40, 0, 23], dtype=torch.int32)
    positions = Positions(q_offset=torch.tensor([36, 0, 19], dtype=torch.int32), kv_lengths=lengths)
    out, lse, mx = flex_decode(
        q,
        k,
        v,
        score_mod=compile_score_mod(None),
        mask_mod=compile_mask_mod(odd_rows),
        tables=mask.tables(),
        scale=0.25,
        positions=positions,
        splits=3,
    )
    assert not out.isnan().any() and not lse.isnan().any()
    masked = torch.zeros(B, Hq, Lq, dtype=torch.bool)
    masked[:, :, 0::2] = True  # positions 36, 38 / 0, 2 / 19 + 1, 19 + 3 are even
    masked[2] = ~masked[2]
    masked[1] = True  # no keys at all
    assert (out[masked] == 0).all()
    assert torch.isneginf(lse[masked]).all() and torch.isneginf(mx[masked]).all()
    assert torch.isfinite(lse[~masked]).all() and (out[~masked].abs().sum(-1) > 0).all()


def test_per_head_mask_packs_one_head_per_tile():
    """A block mask that differs per head: each tile holds one head's tokens (and is still right)."""
    B, Hq, Hkv, Lq, L = 1, 4, 2, 3, 64

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 8 * (h + 1))

    q, k, v = torch.randn(B, Hq, Lq, 16), torch.randn(B, Hkv, L, 16), torch.randn(B, Hkv, L, 16)
    mask = create_block_mask(per_head, None, Hq, L, L, device="cpu", BLOCK_SIZE=16)
    out, lse, _ = flex_decode(
        q,
        k,
        v,
        score_mod=compile_score_mod(None),
        mask_mod=compile_mask_mod(per_head),
        tables=mask.tables(),
        scale=0.25,
        positions=Positions(q_offset=L - Lq),
    )
    full = _whole_sequence(q, [L], L)
    gold = reference_attention(full.double(), k.double(), v.double(), None, mask, 0.25)
    eager = reference_attention(full, k, v, None, mask, 0.25)
    assert_close_to_gold(out, gold[0][:, :, L - Lq :], eager[0][:, :, L - Lq :], name="out")
    assert_close_to_gold(lse, gold[1][:, :, L - Lq :], eager[1][:, :, L - Lq :], name="lse")


def test_rows_beyond_one_tile():
    """4 heads x 6 tokens = 24 packed rows in 16-row tiles: two row tiles per kv head, the second
    starting mid-sequence and its tokens straddling two q blocks of the mask."""
    run_decode(1, 4, 1, 6, 40, 16, "alibi-causal", blocks=(16, 16), tiles=DecodeTiles(16, 16, 4, 1))


def test_out_of_range_positions_stay_in_bounds():
    """Values the host does not read on a GPU (Positions.check) cannot make the kernel read out of
    bounds: key counts are clamped to [0, Lkv] and mask rows to the mask's."""
    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    mask = create_block_mask(_causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    args = dict(
        score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(_causal), tables=mask.tables(), scale=0.3
    )
    wild = Positions(
        q_offset=torch.tensor([39, 500], dtype=torch.int32),
        kv_lengths=torch.tensor([99, -5], dtype=torch.int32),
    )
    out, lse, _ = flex_decode(q, k, v, positions=wild, **args)
    tame = Positions(
        q_offset=torch.tensor([39, 39], dtype=torch.int32),
        kv_lengths=torch.tensor([40, 0], dtype=torch.int32),
    )
    out_tame, lse_tame, _ = flex_decode(q, k, v, positions=tame, **args)
    torch.testing.assert_close(out[0], out_tame[0])
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
