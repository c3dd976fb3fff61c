"""Review of flexattn/call_cache.py: ways a prepared call (a hit) can differ from what the whole
host path does for the same call. Each test names a hazard; the expected behaviour is the whole
path's (its result, or its error).

The kernels run in Triton's interpreter on CPU, as in ``tests/test_call_cache.py`` (whose helpers
these tests reuse): ``misses`` counts the calls that ran the whole host path.
"""

from __future__ import annotations

import os

import pytest

import flexattn.api as api
from flexattn import call_cache, create_block_mask, flex_attention
from tests.test_call_cache import TRITON, H, L, _assert_reference, _inputs, _kept

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@pytest.fixture
def misses(monkeypatch):
    """How many calls on the Triton kernels ran the whole host path (as in tests/test_call_cache.py)."""
    count = [0]
    real = api.run_attention

    def counted(*args, **kwargs):
        count[0] += args[7] == "TRITON"
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run_attention", counted)
    return count


_TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def _head_one_sees_all(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) | (h == 1)


def test_a_mask_table_data_swapped_to_a_view_at_the_same_address_is_not_replayed(misses):
    """Hazard: an entry checks the user's tables by identity, version and data pointer only
    (``_Entry.pointers``), but the host path also reads their shapes and strides (the broadcast
    flags ``MASK_PER_HEAD`` / ``MASK_PER_BATCH``, the mask sizes passed to the kernel, the checks of
    ``_check_block_mask``). ``t.data = t.data[:, :1]`` keeps both the version and the data pointer
    but makes the mask broadcast head 0's lists to every head.

    Expected: the call runs the whole host path (a miss) and head 1 reads head 0's lists, as the
    reference does; a hit replays the recorded per-head launch and head 1 still reads its own
    (now stale) lists."""
    q, k, v = _inputs()
    mask = create_block_mask(_head_one_sees_all, None, H, L, L, device="cpu", BLOCK_SIZE=32)
    _kept(q, k, v, block_mask=mask)
    for name in _TABLES:
        table = getattr(mask, name)
        pointer = table.data_ptr()
        table.data = table.data[:, :1]  # head 0's lists, at the same address, broadcast over heads
        assert table.data_ptr() == pointer and getattr(mask, name).shape[1] == 1
    out = flex_attention(q, k, v, block_mask=mask, kernel_options=TRITON)
    _assert_reference(out, q, k, v, block_mask=mask)  # (a hit: head 1 attends everywhere)
    assert misses[0] == 3


def test_a_mask_table_data_swapped_to_a_wrong_shape_raises_as_the_whole_path_does(misses):
    """Hazard (error parity): as above, a ``.data`` swap to a view at the same address that the
    whole host path refuses (``_check_block_mask``: kv_indices with 1 kv block where the lengths
    need 2) is not seen by the entry's checks.

    Expected: ValueError naming the kv_indices' blocks, as without the entry; a hit returns a result
    computed from the recorded (2-block) shape."""
    q, k, v = _inputs()
    mask = create_block_mask(_head_one_sees_all, None, H, L, L, device="cpu", BLOCK_SIZE=32)
    _kept(q, k, v, block_mask=mask)
    table = mask.kv_indices
    pointer = table.data_ptr()
    table.data = table.data[..., :1]
    assert table.data_ptr() == pointer
    with pytest.raises(ValueError, match="kv_indices have"):
        flex_attention(q, k, v, block_mask=mask, kernel_options=TRITON)


def test_a_hit_raises_as_the_whole_path_does_once_the_interpreter_is_switched_off(misses, monkeypatch):
    """Hazard (error parity): for CPU tensors, whether BACKEND 'TRITON' may run is read from the
    environment on every call (``dispatch.choose_backend``, ``kernels.checks.check_qkv``:
    ``TRITON_INTERPRET``), but the key does not hold it (the module docstring argues a later change
    "is not honoured anyway"; it is: the whole path raises).

    Expected: with TRITON_INTERPRET unset, the call raises the whole path's RuntimeError ("needs
    CUDA tensors ... set TRITON_INTERPRET=1"); a hit returns a result instead."""
    q, k, v = _inputs()
    _kept(q, k, v)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        flex_attention(q, k, v, kernel_options=TRITON)
    call_cache.clear()  # (the whole path, for comparison: it raises)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        flex_attention(q, k, v, kernel_options=TRITON)
