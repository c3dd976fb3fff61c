"""flexattn/call_cache.py: a repeat eager inference call runs only its kept launches, returns what
the whole host path returns, and is never served from an entry that anything it reads has left
behind: a new or edited BlockMask, a changed mod or captured tensor, other options, scale, grad
mode, Positions or thread each run the whole path (and get the right result). Entries hold nothing
of the user's alive and stay bounded.

The kernels run in Triton's interpreter on CPU. ``misses`` counts the calls that ran the whole host
path (``dispatch.run_attention``); a hit returns before it. A key is recorded the second time it
misses (``_kept``: two calls), so a test of what must not hit starts from a kept entry.
"""

from __future__ import annotations

import gc
import os
import threading
import weakref

import pytest
import torch

import flexattn.api as api
import flexattn.autograd as autograd
import flexattn.compiler as compiler
import flexattn.compiler.checks as compiler_checks
import flexattn.compiler.fingerprint as fingerprint
from flexattn import AuxRequest, Positions, call_cache, create_block_mask, flex_attention
from flexattn.kernels import decode, decode_workspace, forward
from flexattn.kernels import positions as positions_module
from flexattn.kernels.launch import LaunchCache
from flexattn.paged import PagedAttention
from flexattn.plan import AttentionPlan

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

TRITON = {"BACKEND": "TRITON"}
REFERENCE = {"BACKEND": "REFERENCE"}
B, H, L, E = 1, 2, 64, 16


@pytest.fixture
def misses(monkeypatch):
    """How many calls on the Triton kernels ran the whole host path."""
    count = [0]
    real = api.run_attention

    def counted(*args, **kwargs):
        count[0] += args[7] == "TRITON"  # (the backend; the reference calls of the checks are not counted)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "run_attention", counted)
    return count


@pytest.fixture
def gpu_positions(monkeypatch):
    """Position tensors treated as a GPU's (their values not read on the host), so that calls with
    them are kept as on CUDA."""
    monkeypatch.setattr(positions_module, "host_readable", lambda t: False)


def _inputs(q_len=L, kv_len=L):
    return torch.randn(B, H, q_len, E), torch.randn(B, H, kv_len, E), torch.randn(B, H, kv_len, E)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 8


def _mask(mod=_causal, q_len=L, kv_len=L):
    return create_block_mask(mod, None, None, q_len, kv_len, device="cpu", BLOCK_SIZE=32)


def _assert_reference(out, q, k, v, **kwargs):
    want = flex_attention(q, k, v, kernel_options=REFERENCE, **kwargs)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def _kept(q, k, v, **kwargs):
    """Calls until the call's launches are kept: two for a new key (the second records), one for a
    key that missed once already."""
    kept = call_cache.kept()
    for _ in range(2):
        out = flex_attention(q, k, v, kernel_options=TRITON, **kwargs)
        if call_cache.kept() == kept + 1:
            return out
    raise AssertionError("the call was not kept")


def _checked_call(misses, count: int, q, k, v, **kwargs):
    """flex_attention on the kernels, after which ``count`` calls have run the whole host path, and
    whose output matches the reference's."""
    out = flex_attention(q, k, v, kernel_options=TRITON, **kwargs)
    assert misses[0] == count
    _assert_reference(out, q, k, v, **kwargs)
    return out


def _cases():
    """id -> (keyword arguments, query length, key length): prefill and decode kernels, mods."""
    bias = torch.randn(H)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx - q_idx)

    lengths = torch.tensor([40], dtype=torch.int32)
    return {
        "noop": (dict(), L, L),
        "causal": (dict(block_mask=_mask()), L, L),
        "alibi-causal": (dict(score_mod=alibi, block_mask=_mask()), L, L),
        "decode-prefill-kernel": (dict(score_mod=alibi), 1, L),
        "split-kv": (dict(positions=Positions(q_offset=lengths - 1, kv_lengths=lengths)), 1, L),
        "split-kv-alibi-causal": (
            dict(score_mod=alibi, block_mask=_mask(), positions=Positions(q_offset=lengths - 1)),
            1,
            L,
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_hit_returns_what_the_whole_host_path_returns(case, misses, gpu_positions):
    kwargs, q_len, kv_len = CASES[case]
    q, k, v = _inputs(q_len, kv_len)
    first = _kept(q, k, v, return_aux=AuxRequest(lse=True, max_scores=True), **kwargs)
    assert misses[0] == 2
    again = flex_attention(
        q, k, v, kernel_options=TRITON, return_aux=AuxRequest(lse=True, max_scores=True), **kwargs
    )
    assert misses[0] == 2, "the repeat call ran the whole host path"
    for got, want in (
        (again[0], first[0]),
        (again[1].lse, first[1].lse),
        (again[1].max_scores, first[1].max_scores),
    ):
        assert torch.equal(got, want)
    new_q = torch.randn_like(q)  # the call's own tensors
    out, lse = flex_attention(new_q, k, v, kernel_options=TRITON, return_lse=True, **kwargs)
    assert misses[0] == 2
    want, want_lse = flex_attention(new_q, k, v, kernel_options=REFERENCE, return_lse=True, **kwargs)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_a_hit_traces_checks_plans_and_chooses_nothing(case, misses, gpu_positions, monkeypatch):
    kwargs, q_len, kv_len = CASES[case]
    q, k, v = _inputs(q_len, kv_len)
    _kept(q, k, v, **kwargs)
    calls: list[str] = []

    def counting(module, name):
        real = getattr(module, name)

        def counted(*args, **kw):
            calls.append(name)
            return real(*args, **kw)

        monkeypatch.setattr(module, name, counted)

    for module, name in (
        (api, "_check_tensors"), (api, "_check_block_mask"), (api, "_check_positions"),
        (api, "check_call"), (api, "_check_mods_trace"), (api, "parse_options"), (compiler_checks, "trace"),
        (compiler, "_program"), (compiler, "_compile"), (autograd, "plan_attention"),
        (AttentionPlan, "choose"), (forward, "check_block_tables"), (decode, "check_call_kv"),
        (decode, "decode_launch"), (decode_workspace, "_allocate"), (fingerprint, "mod_key"),
    ):  # fmt: skip
        counting(module, name)
    flex_attention(q, k, v, kernel_options=TRITON, **kwargs)
    mods = ("score_mod" in kwargs) + ("block_mask" in kwargs)
    assert misses[0] == 2 and calls == ["mod_key"] * mods  # one fingerprint per mod: the key


def test_a_call_not_returning_lse_leaves_an_earlier_lse_alone(misses):
    q, k, v = _inputs()
    _kept(q, k, v)
    _, lse = flex_attention(q, k, v, kernel_options=TRITON, return_lse=True)
    kept_lse = lse.clone()
    flex_attention(torch.randn_like(q), k, v, kernel_options=TRITON)  # its lse goes to a kept buffer
    _, again = flex_attention(torch.randn_like(q), k, v, kernel_options=TRITON, return_lse=True)
    assert misses[0] == 2 and torch.equal(lse, kept_lse) and again.data_ptr() != lse.data_ptr()


def test_a_key_is_recorded_when_it_misses_again():
    q, k, v = _inputs()
    for scale in (0.1, 0.2, 0.3):  # keys that never repeat: nothing recorded, nothing evicted
        flex_attention(q, k, v, scale=scale, kernel_options=TRITON)
    assert call_cache.kept() == 0
    flex_attention(q, k, v, scale=0.2, kernel_options=TRITON)
    assert call_cache.kept() == 1


# ---- what must not hit ---------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["in-place", "new-storage"])
def test_a_block_mask_edited_in_place_or_moved_to_new_storage_is_a_miss(edit, misses):
    q, k, v = _inputs()
    mask, other = _mask(), _mask(_window)
    _kept(q, k, v, block_mask=mask)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        table, new = getattr(mask, name), getattr(other, name)
        if edit == "in-place":
            table.copy_(new)
        else:  # (no new version: a new data pointer)
            table.data = new.clone()
    mask.mask_mod = _window
    _checked_call(misses, 3, q, k, v, block_mask=mask)  # (the reference reads the mask as edited: other's)


def test_one_table_edited_in_place_is_a_miss(misses):
    q, k, v = _inputs()
    mask = _mask()
    before = _kept(q, k, v, block_mask=mask)
    mask.full_kv_num_blocks.zero_()  # only the partial blocks are left: rows see fewer keys
    assert not torch.allclose(_checked_call(misses, 3, q, k, v, block_mask=mask), before)


def test_a_new_mask_object_or_new_tables_are_a_miss(misses):
    q, k, v = _inputs()
    window = _mask(_window)
    _kept(q, k, v, block_mask=_mask())
    _checked_call(misses, 3, q, k, v, block_mask=window)  # the same shapes, another object
    _kept(q, k, v, block_mask=window)  # (its key missed once: this call records it)
    causal = _mask()
    window.kv_indices = causal.kv_indices.clone()  # new tables on the same mask
    window.kv_num_blocks = causal.kv_num_blocks.clone()
    window.full_kv_indices, window.full_kv_num_blocks = causal.full_kv_indices, causal.full_kv_num_blocks
    window.mask_mod = _causal
    _checked_call(misses, 5, q, k, v, block_mask=window)


def test_captured_tensors_updated_rebound_or_reshaped_reach_the_next_call(misses):
    q, k, v = _inputs()
    bias = torch.randn(H)

    def shifted(score, b, h, q_idx, kv_idx):
        return score + bias[h % bias.shape[0]] * (kv_idx - q_idx)

    _kept(q, k, v, score_mod=shifted)
    bias.mul_(-3)  # new values, same tensor
    _checked_call(misses, 3, q, k, v, score_mod=shifted)
    _kept(q, k, v, score_mod=shifted)  # (each key below missed once: one call records it)
    bias = torch.randn(H)  # another tensor in the cell
    _checked_call(misses, 5, q, k, v, score_mod=shifted)
    _kept(q, k, v, score_mod=shifted)
    bias = torch.randn(1)  # another shape
    _checked_call(misses, 7, q, k, v, score_mod=shifted)
    _checked_call(misses, 8, q, k, v, score_mod=shifted)  # recorded
    _checked_call(misses, 8, q, k, v, score_mod=shifted)  # unchanged since: a hit


def test_a_new_mod_options_scale_or_positions_form_is_a_miss(misses, gpu_positions):
    q, k, v = _inputs(1, L)
    lengths = torch.tensor([50], dtype=torch.int32)

    def halved(score, b, h, q_idx, kv_idx):
        return score * 0.5

    calls = [
        dict(),
        dict(score_mod=halved),
        dict(score_mod=lambda score, b, h, q_idx, kv_idx: score * 0.25),
        dict(kernel_options={"BACKEND": "TRITON", "BLOCK_M": 16}),
        dict(kernel_options={"BACKEND": "TRITON", "ROWS_GUARANTEED_SAFE": True}),
        dict(scale=0.5),
        dict(scale=0.25),
        dict(positions=Positions(kv_lengths=lengths)),
        dict(positions=Positions(q_offset=lengths - 1, kv_lengths=lengths)),
    ]
    for kwargs in calls:  # each kept, and every other one's entry before it is not used by it
        options = kwargs.pop("kernel_options", TRITON)
        for _ in range(2):
            before = misses[0]
            out = flex_attention(q, k, v, kernel_options=options, **kwargs)
            assert misses[0] == before + 1, kwargs
        _assert_reference(out, q, k, v, **kwargs)
    assert call_cache.kept() == len(calls)


def test_new_position_tensors_of_the_same_kind_are_read_by_a_hit(misses, gpu_positions):
    q, k, v = _inputs(1, L)
    for n in (64, 64, 10, 33):
        lengths = torch.tensor([n], dtype=torch.int32)
        positions = Positions(q_offset=lengths - 1, kv_lengths=lengths)
        out = flex_attention(q, k, v, kernel_options=TRITON, positions=positions)
        _assert_reference(out, q, k, v, positions=positions)
    assert misses[0] == 2


def test_calls_whose_values_the_host_checks_are_not_kept(misses):
    q, k, v = _inputs(1, L)
    lengths = torch.tensor([20], dtype=torch.int32)  # a CPU tensor: Positions.check reads it
    positions = Positions(kv_lengths=lengths)
    for _ in range(3):
        out = flex_attention(q, k, v, kernel_options=TRITON, positions=positions)
    _assert_reference(out, q, k, v, positions=positions)
    assert call_cache.kept() == 0 and misses[0] == 3
    with pytest.raises(ValueError, match="kv_lengths must lie in"):
        flex_attention(q, k, v, kernel_options=TRITON, positions=Positions(kv_lengths=lengths + 100))


def test_a_new_int_offset_every_step_is_read_by_a_hit(misses):
    """An int q_offset is a value of the call: decode steps at offsets 10, 11, 40, 63 over a causal
    mask of the whole sequence and ALiBi (both see the absolute position) run one key, recorded at
    its second miss; each hit reads its own offset."""
    q, k, v = _inputs(1, L)
    bias = torch.randn(H)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx - q_idx)

    mask = _mask()
    outs = []
    for offset in (10, 11, 40, 63):
        kwargs = dict(score_mod=alibi, block_mask=mask, positions=Positions(q_offset=offset))
        outs.append(flex_attention(q, k, v, kernel_options=TRITON, **kwargs))
        _assert_reference(outs[-1], q, k, v, **kwargs)
    assert misses[0] == 2 and call_cache.kept() == 1
    assert not torch.allclose(outs[2], outs[3])  # (the offset reached the kernel)


def test_an_int_offset_call_whose_mods_index_past_a_capture_is_not_kept(misses):
    """A captured tensor indexed by q_idx that covers the first offsets but not every offset the key
    could serve: the call is not kept, so a later offset past the capture gets the whole path's
    ModIndexError (not a kernel's clamped gather)."""
    from flexattn.compiler.errors import ModIndexError

    q, k, v = _inputs(1, L)
    qbias = torch.randn(20)

    def row_bias(score, b, h, q_idx, kv_idx):
        return score + qbias[q_idx]

    for offset in (3, 4, 5):
        out = flex_attention(
            q, k, v, score_mod=row_bias, kernel_options=TRITON, positions=Positions(q_offset=offset)
        )
        _assert_reference(out, q, k, v, score_mod=row_bias, positions=Positions(q_offset=offset))
    assert call_cache.kept() == 0 and misses[0] == 3
    with pytest.raises(ModIndexError):
        flex_attention(q, k, v, score_mod=row_bias, kernel_options=TRITON, positions=Positions(q_offset=40))


def test_an_int_offset_out_of_range_raises_as_the_whole_path_does(misses):
    """A kept int-offset call checks the new offset as the whole path would: past the mask's Q_LEN
    (or negative) is the whole path's error, not a clamped mask row."""
    q, k, v = _inputs(1, L)
    mask = _mask()
    _kept(q, k, v, block_mask=mask, positions=Positions(q_offset=5))
    with pytest.raises(ValueError, match="build it for the whole sequence"):
        flex_attention(q, k, v, kernel_options=TRITON, block_mask=mask, positions=Positions(q_offset=L))
    with pytest.raises(ValueError, match="q_offset must be an int >= 0"):
        flex_attention(q, k, v, kernel_options=TRITON, block_mask=mask, positions=Positions(q_offset=-1))
    out = flex_attention(q, k, v, kernel_options=TRITON, block_mask=mask, positions=Positions(q_offset=L - 1))
    _assert_reference(out, q, k, v, block_mask=mask, positions=Positions(q_offset=L - 1))


def test_grad_mode_and_requires_grad_keep_calls_apart(misses):
    q, k, v = _inputs()
    q.requires_grad_(True)
    for _ in range(3):  # needs gradients: the autograd Function every time, never kept
        out = flex_attention(q, k, v, kernel_options=TRITON)
        assert out.requires_grad
    assert misses[0] == 3 and call_cache.kept() == 0
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        assert not _kept(q, k, v).requires_grad
        assert not flex_attention(q, k, v, kernel_options=TRITON).requires_grad
    assert misses[0] == 5
    out = flex_attention(q, k, v, kernel_options=TRITON)  # grad on again: not the no-grad entry
    assert out.requires_grad and misses[0] == 6


def test_learnable_captures_are_never_served_inference_outputs(misses):
    q, k, v = _inputs()
    bias = torch.zeros(H, requires_grad=True)

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    with torch.no_grad():
        _kept(q, k, v, score_mod=biased)
    out = flex_attention(q, k, v, score_mod=biased, kernel_options=TRITON)
    out.sum().backward()
    assert misses[0] == 3 and bias.grad is not None


def test_other_threads_keep_their_own_entries(misses):
    q, k, v = _inputs()
    _kept(q, k, v)

    def in_a_thread():
        results.append(flex_attention(q, k, v, kernel_options=TRITON))

    results: list = []
    for _ in range(2):
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
    assert misses[0] == 4  # (a new thread may reuse an ended one's id: it is then the same key)
    assert torch.equal(results[0], flex_attention(q, k, v, kernel_options=TRITON))


def test_a_dropped_split_workspace_is_a_miss(misses, gpu_positions):
    q, k, v = _inputs(1, L)
    lengths = torch.tensor([L], dtype=torch.int32)
    positions = Positions(q_offset=lengths - 1, kv_lengths=lengths)
    _kept(q, k, v, positions=positions)
    decode_workspace.clear()  # the entry held the workspace weakly
    _checked_call(misses, 3, q, k, v, positions=positions)


def test_a_cleared_launch_cache_sends_a_hit_through_triton(misses, monkeypatch):
    calls: list = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(grid)

    monkeypatch.setattr(forward, "_LAUNCHES", LaunchCache(Recorder()))
    q, k, v = _inputs(q_len=129)  # more query rows than one decode tile: the prefill kernel
    _kept(q, k, v)
    forward._LAUNCHES.clear()
    flex_attention(q, k, v, kernel_options=TRITON)
    assert misses[0] == 2 and len(calls) == 3


def test_mods_whose_trace_reads_tensor_values_are_not_kept(misses):
    q, k, v = _inputs()
    weight = torch.tensor(0.5)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * float(weight)  # a value read while tracing: a constant of the generated code

    for _ in range(2):
        flex_attention(q, k, v, score_mod=scaled, kernel_options=TRITON)
    weight.data.fill_(2.0)  # (through .data: the version does not move)
    _checked_call(misses, 3, q, k, v, score_mod=scaled)
    assert call_cache.kept() == 0


def test_a_query_that_is_the_key_is_served_but_not_recorded(misses):
    q, k, v = _inputs()
    for _ in range(3):
        out = flex_attention(q, q, v, kernel_options=TRITON)
    assert misses[0] == 3 and call_cache.kept() == 0
    _assert_reference(out, q, q, v)


def test_a_paged_decode_call_is_kept_and_sees_its_page_table_edited(misses, gpu_positions):
    page, lengths = 16, [40]
    paged = PagedAttention(8, page, 1, device="cpu")
    paged.reserve(0, L)
    k_cache = torch.randn(1, H, 8 * page, E)
    v_cache = torch.randn(1, H, 8 * page, E)
    mask = paged.convert_logical_block_mask(_mask(q_len=L, kv_len=L), torch.arange(1))
    q = torch.randn(1, H, 1, E)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    positions = Positions(q_offset=lengths - 1, kv_lengths=lengths)
    first = _kept(q, k_cache, v_cache, block_mask=mask, positions=positions)
    again = flex_attention(q, k_cache, v_cache, block_mask=mask, kernel_options=TRITON, positions=positions)
    assert torch.equal(again, first) and misses[0] == 2
    table = mask.kv_pages.page_table
    table[0, :4] = table[0, :4].flip(0).clone()  # the four reserved pages, in another order
    moved = flex_attention(q, k_cache, v_cache, block_mask=mask, kernel_options=TRITON, positions=positions)
    assert misses[0] == 3
    gathered = mask.kv_pages.gather(k_cache), mask.kv_pages.gather(v_cache)
    want = flex_attention(q, *gathered, block_mask=_mask(), kernel_options=REFERENCE, positions=positions)
    torch.testing.assert_close(moved, want, atol=1e-4, rtol=1e-4)


def test_the_cache_is_not_used_while_torch_compile_traces(misses):
    q, k, v = _inputs()
    mask = _mask()
    _kept(q, k, v, block_mask=mask)

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(q, k, v):
        return flex_attention(q, k, v, block_mask=mask, kernel_options=TRITON)

    torch._dynamo.reset()
    for _ in range(2):
        out = compiled(q, k, v)
    torch._dynamo.reset()
    assert call_cache.kept() == 1 and misses[0] == 2
    _assert_reference(out, q, k, v, block_mask=mask)


# ---- memory ----------------------------------------------------------------------------------------


def test_an_entry_keeps_no_mask_mod_or_captured_tensor_alive():
    def kept_call() -> list:
        """Weak references to what a kept call used: its mask, a table, a captured tensor, the mod."""
        q, k, v = _inputs()
        mask = _mask()
        bias = torch.randn(H)

        def biased(score, b, h, q_idx, kv_idx):
            return score + bias[h]

        _kept(q, k, v, score_mod=biased, block_mask=mask)
        return [weakref.ref(obj) for obj in (mask, mask.kv_indices, bias, biased, q)]

    refs = kept_call()
    gc.collect()
    assert call_cache.kept() == 1 and all(ref() is None for ref in refs)


def test_the_entries_are_bounded(monkeypatch):
    monkeypatch.setattr(call_cache, "SIZE", 3)
    q, k, v = _inputs()
    for scale in (0.1, 0.2, 0.3, 0.4, 0.5):
        for _ in range(2):
            flex_attention(q, k, v, scale=scale, kernel_options=TRITON)
    assert call_cache.kept() == 3


# ---- .data swaps of the mask tables, TRITON_INTERPRET (found in review) ----------------------------


_TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def _head_one_sees_all(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) | (h == 1)


def test_a_mask_table_data_swapped_to_a_view_at_the_same_address_is_not_replayed(misses):
    """An entry checks the user's tables by identity, version and data pointer, and also their
    shapes, strides and dtypes, which the host path reads (the broadcast
    flags ``MASK_PER_HEAD`` / ``MASK_PER_BATCH``, the mask sizes passed to the kernel, the checks of
    ``_check_block_mask``). ``t.data = t.data[:, :1]`` keeps both the version and the data pointer
    but makes the mask broadcast head 0's lists to every head.

    The call runs the whole host path (a miss) and head 1 reads head 0's lists, as the reference
    does (a replay of the recorded per-head launch would have head 1 read its own, stale, lists)."""
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
    """Error parity: a ``.data`` swap to a view at the same address that the whole host path refuses
    (``_check_block_mask``: kv_indices with 1 kv block where the lengths need 2) raises its
    ValueError, not a result computed from the recorded (2-block) shape."""
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
    """Error parity: for CPU tensors the whole path reads ``TRITON_INTERPRET`` on every call
    (``dispatch.choose_backend``, ``kernels.checks.check_qkv``), and so does the key: with it unset
    the call raises the whole path's RuntimeError ("needs CUDA tensors ... set TRITON_INTERPRET=1"),
    it is not served from the entry kept while it was set."""
    q, k, v = _inputs()
    _kept(q, k, v)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        flex_attention(q, k, v, kernel_options=TRITON)
    call_cache.clear()  # (the whole path, for comparison: it raises)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        flex_attention(q, k, v, kernel_options=TRITON)
