"""The host path of an eager call: a repeat call with unchanged mods and mask traces nothing, runs
no tensor operation but the allocation of its outputs and the kernel launch, and never waits on the
device; anything that changed (a rebound or updated captured tensor, an edited BlockMask, an edited
options dict) is seen on the next call, and errors are raised on every call. (A repeat inference
call is served by ``flexattn/call_cache.py``, tested in ``tests/test_call_cache.py``; the cases here
it does not keep run the whole path.)

The kernel launch is replaced by a recorder where a test counts operations (Triton's interpreter
itself copies tensors to NumPy); tests of values run the real kernels in the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flexattn.compiler as compiler
import flexattn.compiler.checks as compiler_checks
from flexattn import Positions, call_cache, create_block_mask, flex_attention
from flexattn.compiler import ModCompileError
from flexattn.kernels import decode, forward
from flexattn.kernels.launch import LaunchCache
from flexattn.kernels.tiles import forward_tiles
from flexattn.options import KernelOptions, parse_options
from flexattn.plan import noop_tables

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
pytestmark = interpreted

TRITON = {"BACKEND": "TRITON"}
B, H, L, E = 1, 2, 64, 16
PREPARED_ALLOCATIONS = ["aten.empty_strided.default"]  # out; lse and max_scores go to kept buffers


class OpLog(TorchDispatchMode):
    """Every ATen operation run while active (factories included), by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Forward and decode kernel launches, recorded instead of run: (grid, args, constexprs) per launch."""
    calls: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    for module, name in ((forward, "_LAUNCHES"), (decode, "_SPLIT_LAUNCHES"), (decode, "_MERGE_LAUNCHES")):
        monkeypatch.setattr(module, name, LaunchCache(Recorder()))
    return calls


@pytest.fixture
def traces(monkeypatch):
    """How many times a mod is traced (by the checks or by the compiler)."""
    count = [0]

    def counting(real):
        def traced(*args, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)

        return traced

    monkeypatch.setattr(compiler_checks, "trace", counting(compiler_checks.trace))
    monkeypatch.setattr(compiler, "_program", counting(compiler._program))
    return count


def _inputs(q_len=L):
    q = torch.randn(B, H, q_len, E)
    k, v = torch.randn(B, H, L, E), torch.randn(B, H, L, E)
    return q, k, v


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _cases():
    """id -> (score_mod, block_mask, query length): the shapes and mod kinds of the host path."""
    bias = torch.randn(H)
    doc = torch.arange(L) // 24

    def alibi(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx - q_idx)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    causal = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    documents = create_block_mask(same_doc, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    # the split-KV decode kernel (one launch, a reused workspace); per-sequence Positions tensors
    # are left out: on the CPU their values are checked (Positions.check), on a GPU only their metadata
    last = Positions(q_offset=L - 1)
    return {
        "noop": (None, None, L, None),
        "causal": (None, causal, L, None),
        "alibi-causal": (alibi, causal, L, None),
        "document": (None, documents, L, None),
        "decode-Lq1": (None, None, 1, None),
        "split-kv-Lq1": (None, None, 1, last),
        "split-kv-alibi-causal": (alibi, causal, 1, last),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_repeat_call_traces_nothing_and_runs_only_its_output_allocations(case, launches, traces):
    score_mod, block_mask, q_len, positions = CASES[case]
    q, k, v = _inputs(q_len)
    call = lambda: flex_attention(  # noqa: E731
        q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=TRITON, positions=positions
    )
    call()
    traced_once = traces[0]
    call()  # (the second call records the launches: call_cache.py)
    with OpLog() as log:
        out = call()
    assert traces[0] == traced_once, "a repeat call traced a mod again"
    assert call_cache.kept(), "the repeat call was not kept"  # (an int q_offset too: a value of the call)
    assert sorted(log.ops) == sorted(PREPARED_ALLOCATIONS), log.ops  # (the split workspace is reused)
    kernels = 1  # prefill, or decode's split kernel with its fused merge (the default)
    assert len(launches) == 3 * kernels and out.shape == (B, H, q_len, E)


@pytest.mark.parametrize("case", list(CASES))
def test_a_repeat_call_never_synchronises_with_the_device(case, launches, monkeypatch):
    score_mod, block_mask, q_len, positions = CASES[case]
    q, k, v = _inputs(q_len)
    call = lambda: flex_attention(  # noqa: E731
        q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=TRITON, positions=positions
    )
    call()
    syncs: list[str] = []

    def refuse(name):
        def sync(*args, **kwargs):
            syncs.append(name)
            raise AssertionError(f"the host path called {name}")

        return sync

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    monkeypatch.setattr(torch.cuda, "synchronize", refuse("torch.cuda.synchronize"))
    with OpLog() as log:
        call()  # (recorded: call_cache.py)
        call()  # (served from the recording where it was kept)
    monkeypatch.undo()
    assert syncs == [] and "aten._local_scalar_dense.default" not in log.ops


def _run(q, k, v, score_mod=None, block_mask=None):
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=TRITON)
    want = flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options={"BACKEND": "REFERENCE"}
    )
    return out, want


def test_rebinding_or_updating_a_captured_tensor_reaches_the_next_call():
    q, k, v = _inputs()
    bias = torch.randn(H)

    def shifted(score, b, h, q_idx, kv_idx):
        return score + bias[h] * (kv_idx - q_idx)

    first, want = _run(q, k, v, shifted)
    torch.testing.assert_close(first, want, atol=1e-4, rtol=1e-4)
    bias = torch.randn(H) * 3  # the closure cell now holds another tensor
    rebound, want = _run(q, k, v, shifted)
    torch.testing.assert_close(rebound, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rebound, first, atol=1e-3)
    bias.mul_(-1)  # the same tensor, new values
    updated, want = _run(q, k, v, shifted)
    torch.testing.assert_close(updated, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(updated, rebound, atol=1e-3)


def test_an_edited_block_mask_is_read_as_it_is_now():
    q, k, v = _inputs()
    mask = create_block_mask(_causal, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    causal, want = _run(q, k, v, block_mask=mask)
    torch.testing.assert_close(causal, want, atol=1e-4, rtol=1e-4)

    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 8

    other = create_block_mask(window, None, None, L, L, device="cpu", BLOCK_SIZE=32)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        getattr(mask, name).copy_(getattr(other, name))  # edited in place, same shapes
    mask.mask_mod = window
    edited, want = _run(q, k, v, block_mask=mask)
    torch.testing.assert_close(edited, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(edited, _run(q, k, v, block_mask=other)[1], atol=1e-4, rtol=1e-4)


def test_an_edited_options_dict_is_parsed_again():
    q, k, v = _inputs()
    options = {"BACKEND": "TRITON"}
    flex_attention(q, k, v, kernel_options=options)
    options["BLOCK_M"] = 48
    with pytest.raises(ValueError, match=r"kernel_options\['BLOCK_M'\] must be a power of two"):
        flex_attention(q, k, v, kernel_options=options)


def test_the_options_memo_tells_true_from_one():
    assert parse_options({"ROWS_GUARANTEED_SAFE": True}).ROWS_GUARANTEED_SAFE is True
    with pytest.raises(ValueError, match="ROWS_GUARANTEED_SAFE'] must be a bool, got 1"):
        parse_options({"ROWS_GUARANTEED_SAFE": 1})
    assert parse_options({"BLOCK_M": 64}) == KernelOptions(BLOCK_M=64)
    for _ in range(2):  # an unhashable value is refused every time, not remembered
        with pytest.raises(ValueError, match="power of two"):
            parse_options({"BLOCK_M": [64]})


def test_errors_are_raised_on_every_call():
    q, k, v = _inputs()

    def branches(score, b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return score
        return score * 2

    for _ in range(2):
        with pytest.raises(ModCompileError, match="branches"):
            flex_attention(q, k, v, score_mod=branches, kernel_options=TRITON)
        with pytest.raises(ValueError, match="Unknown kernel_options key 'BLOCK_Q'"):
            flex_attention(q, k, v, kernel_options={"BLOCK_Q": 16})
        with pytest.raises(ValueError, match="multiples of 16"):
            forward_tiles(head_dim=64, v_head_dim=64, dtype=torch.float16, q_len=64, kv_len=64,
                          q_block=24, kv_block=128, capability=(9, 0), shared_memory_limit=232448,
                          options=None)  # fmt: skip


def test_the_tile_choice_is_remembered_per_covering_tile_not_per_length():
    common = dict(head_dim=64, v_head_dim=64, dtype=torch.float16, q_block=128, kv_block=128,
                  capability=(9, 0), shared_memory_limit=232448, options=KernelOptions())  # fmt: skip
    short = forward_tiles(q_len=20, kv_len=300, **common)
    assert forward_tiles(q_len=31, kv_len=511, **common) is short  # both covered by 32 x 512 tiles
    assert forward_tiles(q_len=33, kv_len=300, **common).BLOCK_M > short.BLOCK_M
    user = {**common, "options": KernelOptions(BLOCK_M=16)}
    assert forward_tiles(q_len=20, kv_len=300, **user).BLOCK_M == 16


def test_the_every_block_full_tables_are_built_once_per_block_counts():
    cpu = torch.device("cpu")
    tables = noop_tables(100, 200, cpu)
    assert noop_tables(128, 129, cpu) is tables  # 1 x 2 blocks of 128 both times
    assert noop_tables(129, 129, cpu) is not tables
    assert tables.full_kv_num_blocks.flatten().tolist() == [2]
    assert tables.full_kv_indices.flatten().tolist() == [0, 1] and tables.kv_num_blocks.sum() == 0
