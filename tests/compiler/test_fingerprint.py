"""Repeat compiles of an unchanged mod skip the trace; any change a trace could see traces again.

``trace_count`` counts real traces (``flexattn.compiler._program``). Every test that expects a
cache hit also checks that a changed mod is traced again *and computes the new values*: a stale
hit would be a wrong answer, not just a slow one.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import types
import weakref
from typing import NamedTuple

import pytest
import torch

import flexattn
import flexattn.compiler as compiler
from flexattn import variants
from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.compiler.fingerprint import mod_key
from tests.compiler.harness import eager_mask, eager_score, run_mask, run_score

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

TABLE = torch.randn(4, 64)  # module-level state that mods below read as globals
OFFSET = 3


def global_table_bias(score, b, h, q_idx, kv_idx):
    return score + TABLE[h, (q_idx - kv_idx + OFFSET) % 64]


SETTINGS = types.ModuleType("user_settings")  # a user module: its attributes may change any time
SETTINGS.WINDOW = 4


class Config:
    window = 4


def window_from_module(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= SETTINGS.WINDOW


def window_from_class(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= Config.window


class TupleConfig(NamedTuple):  # a user tuple subclass: a class attribute, not a field, sets the window
    name: str = "window"
    window = 4


TUPLE_CONFIG = TupleConfig()


def window_from_tuple_subclass(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= TUPLE_CONFIG.window


def _helper(x):
    return x * OFFSET


def causal_with_metadata(b, h, q_idx, kv_idx):  # carries a setting for other mods as an attribute
    return q_idx >= kv_idx


causal_with_metadata.window = 4


def decay_over_the_window(score, b, h, q_idx, kv_idx):
    return score - (q_idx - kv_idx).abs() / causal_with_metadata.window


def calls_helper(score, b, h, q_idx, kv_idx):
    return score + _helper(q_idx)


@pytest.fixture
def trace_count(monkeypatch):
    """A list that grows by one entry per real trace."""
    traced: list = []
    real = compiler._program

    def counting(mod, kind, device):
        traced.append(getattr(mod, "__name__", "mod"))  # not the mod: it would keep its tensors alive
        return real(mod, kind, device)

    monkeypatch.setattr(compiler, "_program", counting)
    compiler.clear_cache()
    return traced


def _tile(M=16, N=32):
    """score (M, N), q_idx (M,), kv_idx (N,): fresh random positions below 64."""
    q_idx = torch.randint(0, 64, (M,), dtype=torch.int32)
    kv_idx = torch.randint(0, 64, (N,), dtype=torch.int32)
    return torch.randn(M, N), q_idx, kv_idx


def _assert_score_mod_runs_like_eager(mod, b=0, h=1):
    score, q_idx, kv_idx = _tile()
    got = run_score(compile_score_mod(mod, device="cpu"), score, b, h, q_idx, kv_idx)
    torch.testing.assert_close(got, eager_score(mod, score, b, h, q_idx, kv_idx))


def test_an_unchanged_mod_is_traced_once(trace_count):
    mod = variants.sliding_window(64)
    first = compile_mask_mod(mod, device="cpu")
    assert compile_mask_mod(mod, device="cpu") == first
    assert len(trace_count) == 1


def test_a_fresh_closure_with_the_same_contents_hits(trace_count):
    compile_mask_mod(variants.sliding_window(64), device="cpu")
    compile_mask_mod(variants.sliding_window(64), device="cpu")
    assert len(trace_count) == 1
    compile_mask_mod(variants.sliding_window(65), device="cpu")  # another number: another trace
    assert len(trace_count) == 2


@interpreted
def test_a_changed_closure_number_computes_the_new_values(trace_count):
    for window in (4, 9, 4):
        mod = variants.sliding_window(window)
        _, q_idx, kv_idx = _tile()
        got = run_mask(compile_mask_mod(mod, device="cpu"), 0, 0, q_idx, kv_idx)
        assert torch.equal(got, eager_mask(mod, 0, 0, q_idx, kv_idx))
    assert len(trace_count) == 2  # the second window 4 is a hit


@interpreted
def test_rebinding_a_global_tensor_or_number_traces_again(trace_count, monkeypatch):
    module = sys.modules[__name__]
    _assert_score_mod_runs_like_eager(global_table_bias)
    _assert_score_mod_runs_like_eager(global_table_bias)
    assert len(trace_count) == 1
    monkeypatch.setattr(module, "TABLE", torch.randn(4, 64))
    _assert_score_mod_runs_like_eager(global_table_bias)
    monkeypatch.setattr(module, "OFFSET", 5)
    _assert_score_mod_runs_like_eager(global_table_bias)
    assert len(trace_count) == 3


@interpreted
def test_a_global_read_by_a_called_helper_is_part_of_the_key(trace_count, monkeypatch):
    _assert_score_mod_runs_like_eager(calls_helper)
    monkeypatch.setattr(sys.modules[__name__], "OFFSET", 7)
    _assert_score_mod_runs_like_eager(calls_helper)
    assert len(trace_count) == 2


@interpreted
def test_an_attribute_of_a_function_the_mod_reads_is_part_of_the_key(trace_count, monkeypatch):
    _assert_score_mod_runs_like_eager(decay_over_the_window)
    monkeypatch.setattr(causal_with_metadata, "window", 9)
    _assert_score_mod_runs_like_eager(decay_over_the_window)
    assert len(trace_count) == 2


@interpreted
def test_in_place_updates_and_requires_grad_trace_again_without_new_code(trace_count):
    table = torch.randn(4, 64)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx) % 64]

    _assert_score_mod_runs_like_eager(bias)
    table.mul_(2.0)  # the version counter moves: traced again (cheap), code reused
    before = compiler.codegen_count()
    _assert_score_mod_runs_like_eager(bias)
    assert len(trace_count) == 2 and compiler.codegen_count() == before
    table.requires_grad_(True)
    assert compile_score_mod(bias, device="cpu").grad_captures[0] is table
    assert len(trace_count) == 3


def test_mods_the_key_cannot_describe_are_traced_every_call(trace_count):
    class Shift(torch.nn.Module):
        def forward(self, score, b, h, q_idx, kv_idx):
            return score + 1.0

    settings = {"window": 8}

    def reads_a_dict(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= settings["window"]

    partial = functools.partial(lambda score, b, h, q_idx, kv_idx, c: score * c, c=2.0)
    for _ in range(2):
        compile_score_mod(Shift(), device="cpu")
        compile_mask_mod(reads_a_dict, device="cpu")
        compile_score_mod(partial, device="cpu")
    assert len(trace_count) == 6
    assert mod_key(reads_a_dict, []) is None and mod_key(partial, []) is None


def test_composed_masks_are_keyed_by_their_parts():
    def key(mod):
        return mod_key(mod, [])

    both = flexattn.and_masks(variants.causal(), variants.sliding_window(16))
    assert key(both) == key(flexattn.and_masks(variants.causal(), variants.sliding_window(16)))
    assert key(both) != key(flexattn.and_masks(variants.causal(), variants.sliding_window(17)))
    assert key(both) is not None


def test_key_tells_tensors_apart_by_identity_shape_and_dtype():
    a, b = torch.zeros(8), torch.zeros(8)

    def over(t):
        return lambda b_, h, q_idx, kv_idx: t[q_idx] > 0

    assert mod_key(over(a), []) == mod_key(over(a), [])
    assert mod_key(over(a), []) != mod_key(over(b), [])
    assert mod_key(over(a), []) != mod_key(over(a.to(torch.int32)), [])


def test_device_and_interpreter_are_part_of_the_cache_key(trace_count, monkeypatch):
    mod = variants.causal()
    compile_mask_mod(mod, device="cpu")
    compile_mask_mod(mod)  # no device: another target decision
    assert len(trace_count) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1")
    compile_mask_mod(mod, device="cpu")
    assert len(trace_count) == 3


def test_compile_mods_shares_the_separate_compiles_cache_entries(trace_count, monkeypatch):
    """One call's two compiles (one environment read) key as compile_score_mod / compile_mask_mod."""
    score, mask = variants.tanh_softcap(20.0), variants.causal()
    both = compiler.compile_mods(score, mask, device=torch.device("cpu"))
    assert both == (compile_score_mod(score, device="cpu"), compile_mask_mod(mask, device="cpu"))
    assert len(trace_count) == 2
    assert compiler.compile_mods(None, None, device="cpu") == (
        compile_score_mod(None, device="cpu"),
        compile_mask_mod(None, device="cpu"),
    )
    assert len(trace_count) == 4
    monkeypatch.setenv("TRITON_INTERPRET", "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1")
    compiler.compile_mods(score, mask, device="cpu")
    assert len(trace_count) == 6


def test_the_cache_is_bounded(trace_count, monkeypatch):
    monkeypatch.setattr(compiler._KERNEL_MODS, "size", 4)
    for window in range(10):
        compile_mask_mod(variants.sliding_window(window), device="cpu")
    assert len(compiler._KERNEL_MODS) == 4
    compile_mask_mod(variants.sliding_window(9), device="cpu")  # most recent: still there
    assert len(trace_count) == 10
    compile_mask_mod(variants.sliding_window(0), device="cpu")  # evicted: traced again
    assert len(trace_count) == 11


@interpreted
@pytest.mark.parametrize(
    "mod",
    [window_from_module, window_from_class, window_from_tuple_subclass],
    ids=["module", "class", "tuple-subclass"],
)
def test_attributes_of_user_modules_and_classes_are_never_cached(mod, trace_count, monkeypatch):
    assert mod_key(mod, []) is None  # SETTINGS' identity, TUPLE_CONFIG's items say nothing of the window
    for window in (4, 9):
        monkeypatch.setattr(SETTINGS, "WINDOW", window)
        monkeypatch.setattr(Config, "window", window)
        monkeypatch.setattr(TupleConfig, "window", window)
        _, q_idx, kv_idx = _tile()
        got = run_mask(compile_mask_mod(mod, device="cpu"), 0, 0, q_idx, kv_idx)
        assert torch.equal(got, eager_mask(mod, 0, 0, q_idx, kv_idx))
    assert len(trace_count) == 2


def test_library_modules_are_keyed_and_the_default_dtype_is_part_of_the_key():
    def uses_torch(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score * torch.tensor(0.5), score)

    key = mod_key(uses_torch, [])
    assert key is not None and key == mod_key(uses_torch, [])
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert mod_key(uses_torch, []) != key
    finally:
        torch.set_default_dtype(default)


def _table_bias(table):
    def table_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx % 64]

    return table_bias


def test_the_cache_keeps_no_captured_tensor_alive(trace_count):
    """A loop that builds a new tensor and closure each step must not pin every old tensor."""
    refs = []
    for _ in range(5):
        table = torch.randn(4, 64)
        refs.append(weakref.ref(table))
        compile_score_mod(_table_bias(table), device="cpu")
    del table
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(trace_count) == 5


@interpreted
def test_a_dead_tensor_whose_id_is_reused_is_not_a_hit(trace_count):
    """After a captured tensor dies its id can name a new tensor of the same shape: trace again."""
    for step in range(20):
        _assert_score_mod_runs_like_eager(_table_bias(torch.randn(4, 64)))
        gc.collect()
        assert len(trace_count) == step + 1  # every step's fresh tensor is traced, never served stale


@interpreted
def test_a_fresh_closure_over_a_live_tensor_hits_and_computes_with_it(trace_count):
    table = torch.randn(4, 64)

    def make():
        return lambda score, b, h, q_idx, kv_idx: score + table[h, q_idx % 64]

    for _ in range(3):
        _assert_score_mod_runs_like_eager(make())
    assert len(trace_count) == 1
    table.copy_(torch.randn(4, 64))  # new values in place: a trace (version), the same code
    _assert_score_mod_runs_like_eager(make())
    assert len(trace_count) == 2


def _temperature_mods(temperature: torch.Tensor) -> dict:
    """Mods that read ``temperature``'s value while tracing, so the generated code holds it."""

    def as_float(score, b, h, q_idx, kv_idx):
        return score / float(temperature)

    def as_branch(score, b, h, q_idx, kv_idx):
        return score * 2.0 if temperature > 2 else score

    def as_fill(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, torch.full_like(score, temperature))

    return {"float": as_float, "branch": as_branch, "full-like": as_fill}


@interpreted
@pytest.mark.parametrize("read", ["float", "branch", "full-like"])
def test_a_trace_that_reads_a_tensor_value_is_not_cached(read, trace_count):
    """A write through ``.data`` (or a numpy view) changes the value but not the version counter."""
    temperature = torch.tensor(1.0)
    mod = _temperature_mods(temperature)[read]
    for value in (1.0, 4.0):
        temperature.data.fill_(value)
        _assert_score_mod_runs_like_eager(mod)
    assert len(trace_count) == 2


def test_reading_a_tensor_shape_is_not_reading_its_values(trace_count):
    table = torch.randn(4, 64)

    def wrap_around(score, b, h, q_idx, kv_idx):
        return score + table[h, (q_idx - kv_idx) % table.shape[-1]] * table.size(0)

    for _ in range(2):
        compile_score_mod(wrap_around, device="cpu")
    assert len(trace_count) == 1


@interpreted
def test_a_tensor_computed_while_tracing_belongs_to_one_call(trace_count):
    """``log_scale.exp()`` runs at trace time: its result and its autograd node are one call's own.

    Two forwards before their backwards (gradient accumulation, two losses): a KernelMod reused by
    the second forward would route both gradients through one exp node, freed by the first backward.
    """
    log_scale = torch.zeros(2, requires_grad=True)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * log_scale.exp()[h]

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    triton = {"BACKEND": "TRITON"}
    losses = [
        flexattn.flex_attention(q, k, v, score_mod=scaled, kernel_options=triton).sum() for _ in range(2)
    ]
    for loss in losses:
        loss.backward()  # a reused exp node: "backward through the graph a second time"
    reference = {"BACKEND": "REFERENCE"}
    gold = torch.autograd.grad(  # float64 scores (log_scale.exp() promotes to them)
        flexattn.flex_attention(
            q.double(), k.double(), v.double(), score_mod=scaled, kernel_options=reference
        ).sum(),
        log_scale,
    )[0]
    # An absolute bound, not assert_close's float32 default (rtol 1.3e-6, relative to the entry):
    # each entry sums 2 x 1024 terms d(score) * score that cancel (softmax rows): their |terms| add
    # to about 100-250 while the entry is a few units. The kernels' float32 summation order is off
    # by up to 1.5e-7 of that sum (3e-5 at most over 460 seeds), which the default rejected for about
    # one seed in 50. A gradient lost or counted twice is off by |gold| (above 0.2 in every seed).
    torch.testing.assert_close(log_scale.grad, 2 * gold, rtol=0, atol=1e-4)


@interpreted
def test_a_new_default_dtype_traces_again_and_promotes_with_it(trace_count):
    def tenths(b, h, q_idx, kv_idx):  # q_idx * 0.1 is float32 or float64, as the default dtype says
        return (q_idx * 0.1 - kv_idx * 0.1) * 10 == q_idx - kv_idx

    q_idx = kv_idx = torch.arange(64, dtype=torch.int32)
    default = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.float64):
            torch.set_default_dtype(dtype)
            got = run_mask(compile_mask_mod(tenths, device="cpu"), 0, 0, q_idx, kv_idx)
            assert torch.equal(got, eager_mask(tenths, 0, 0, q_idx, kv_idx))
    finally:
        torch.set_default_dtype(default)
    assert len(trace_count) == 2
