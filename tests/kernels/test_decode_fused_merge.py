"""The decode kernel's fused merge (``flex_decode(merge="FUSED")``, kernel_options DECODE_MERGE):
the last split of each tile to finish merges the partials in the same launch.

Against the float64 reference (``test_decode.run_decode``) and against the merge kernel, whose
arithmetic it shares (``decode._merge_rows``), so the two agree to the bit; the arrival counters in
the reused workspace end every call at zero. On CPU through Triton's interpreter, which runs the
programs one after another: the GPU's ordering (barrier, acq_rel atomic, L2 reads) is checked by
``test_decode_gpu.py``'s real sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import create_block_mask, flex_attention
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels import decode_workspace
from flexattn.kernels.decode import flex_decode
from flexattn.kernels.kernel_choice import DecodeTiles
from flexattn.kernels.launch import recording
from flexattn.kernels.positions import Positions
from tests.kernels.test_decode import _causal, run_decode

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel tests run through TRITON_INTERPRET=1"
)

CASES = [
    # (B, Hq, Hkv, Lq, L, E, variant, blocks, splits, lengths)
    (2, 4, 1, 1, 97, 16, "causal", (16, 16), 3, None),
    (1, 8, 2, 4, 300, 16, "alibi-causal", (32, 32), 5, None),
    (3, 4, 2, 2, 70, 16, "noop", (16, 16), 4, [70, 5, 33]),  # ragged: splits past a sequence never arrive
    (1, 3, 1, 5, 41, 64, "sliding", (16, 16), 2, None),
]


@pytest.mark.parametrize(
    "B, Hq, Hkv, Lq, L, E, variant, blocks, splits, lengths",
    CASES,
    ids=[f"B{c[0]}-H{c[1]}/{c[2]}-Lq{c[3]}-L{c[4]}-{c[6]}-splits{c[8]}" for c in CASES],
)
def test_fused_merge_matches_reference_and_merge_kernel(
    B, Hq, Hkv, Lq, L, E, variant, blocks, splits, lengths
):
    torch.manual_seed(B * 1000 + L)
    q, k, v, out, lse, mx = run_decode(
        B, Hq, Hkv, Lq, L, E, variant, blocks=blocks, splits=splits, lengths=lengths, merge="FUSED"
    )
    torch.manual_seed(B * 1000 + L)  # the same inputs and mods again, merged by the merge kernel
    _, _, _, out_k, lse_k, mx_k = run_decode(
        B, Hq, Hkv, Lq, L, E, variant, blocks=blocks, splits=splits, lengths=lengths, merge="KERNEL"
    )
    assert torch.equal(out, out_k) and torch.equal(lse, lse_k) and torch.equal(mx, mx_k)


def test_rows_beyond_one_tile_are_merged_per_tile():
    """24 packed rows in 16-row tiles: each row tile counts its own splits' arrivals."""
    run_decode(1, 4, 1, 6, 40, 16, "alibi-causal", tiles=DecodeTiles(16, 16, 4, 1), splits=3, merge="FUSED")


def test_empty_sequences_and_the_counters_between_calls():
    """A sequence with no keys gets out 0, lse = max = -inf from split 0 alone; after every call the
    reused workspace's arrival counters are zero again, so the next call (other lengths) is right."""
    decode_workspace.clear()
    B, Hq, Lq, L = 3, 4, 2, 40
    q, k, v = torch.randn(B, Hq, Lq, 16), torch.randn(B, 2, L, 16), torch.randn(B, 2, L, 16)
    mask = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)
    mods = dict(score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(_causal))
    args = dict(**mods, tables=mask.tables(), scale=0.25, splits=3)
    for lengths in ([40, 0, 23], [7, 40, 0], [40, 40, 40]):
        n = torch.tensor(lengths, dtype=torch.int32)
        positions = Positions(q_offset=(n - Lq).clamp(min=0), kv_lengths=n)
        fused = flex_decode(q, k, v, positions=positions, merge="FUSED", **args)
        kernel = flex_decode(q, k, v, positions=positions, merge="KERNEL", **args)
        for name, a, b in zip(("out", "lse", "max_scores"), fused, kernel):
            assert torch.equal(a, b), f"{name} with lengths {lengths}"
        for b, length in enumerate(lengths):
            if length == 0:
                assert (fused[0][b] == 0).all() and torch.isneginf(fused[1][b]).all()
        (work,) = decode_workspace._WORKSPACES.values()
        assert (work.arrivals == 0).all(), f"arrival counters left at {work.arrivals.nonzero().tolist()}"


def test_kernel_option_chooses_the_fused_merge():
    """kernel_options DECODE_MERGE reaches the decode kernel (one launch fused, the default; two with
    the merge kernel); a bad value names the key and its values."""
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    where = Positions(q_offset=63)
    outs, counts = [], []
    for options in ({"BACKEND": "TRITON", "DECODE_MERGE": "KERNEL"}, {"BACKEND": "TRITON"}):
        with recording() as launches:
            outs.append(flex_attention(q, k, v, positions=where, enable_gqa=True, kernel_options=options))
        counts.append([launch.cache.fn.__name__ for launch in launches])
    assert counts == [["_decode_split_kernel", "_decode_merge_kernel"], ["_decode_split_kernel"]]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match=r"DECODE_MERGE.*\('KERNEL', 'FUSED'\)"):
        flex_attention(q, k, v, positions=where, enable_gqa=True, kernel_options={"DECODE_MERGE": "fused"})
    with pytest.raises(ValueError, match="merge must be one of"):
        flex_decode(q, k, v, score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(None), tables=None,
                    scale=0.25, merge="twice")  # fmt: skip
