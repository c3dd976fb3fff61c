"""Fast math where the result cannot tell (docs/kernel_options.md, "Fast math").

With fp16/bf16 inputs on NVIDIA GPUs, ``torch.tanh`` in a score mod becomes ``tanh.approx.f32``,
except where a value decides a mask bit or an index; fp32 inputs, the interpreter and
``fast_math=False`` keep the exact tanh. Triton's interpreter cannot run inline assembly, so on CPU
these tests check which code each case gets (and that the option reaches the compiler); the bound
itself is measured against float64 on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn import KernelOptions, create_block_mask, flex_attention
from flexattn.compiler import _program, compile_score_mod
from flexattn.compiler.autodiff import differentiate
from flexattn.compiler.codegen import forward_function, gradient_function
from flexattn.options import fast_math_for
from flexattn.plan import plan_attention
from tests.helpers import assert_close_to_gold, gold_and_eager


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def _bucketed(score, b, h, q_idx, kv_idx):
    return score + torch.floor(torch.tanh(score) * 4)  # the tanh decides an integer: exact


def _sources(mod, target, fast_math):
    program = _program(mod, "score", None)
    graph, output = program.graph, program.output
    gradient = differentiate(graph, output, set())
    forward = forward_function(graph, output, "score", target, "f", fast_math)
    backward = gradient_function(graph, output, gradient.dscore, [], target, "g", fast_math)
    return forward, backward


def test_tanh_becomes_the_hardware_instruction_where_invisible():
    for source in _sources(_softcap, "cuda", fast_math=True):
        assert "tm.fast_tanh(" in source and "libdevice.tanh" not in source
    for source in _sources(_softcap, "cuda", fast_math=False):
        assert "libdevice.tanh(" in source and "fast_tanh" not in source


@pytest.mark.parametrize("target", ["interpreter", "hip"])
def test_targets_without_the_instruction_keep_the_exact_tanh(target):
    for source in _sources(_softcap, target, fast_math=True):
        assert "fast_tanh" not in source


def test_a_tanh_that_decides_an_integer_stays_exact():
    forward, _ = _sources(_bucketed, "cuda", fast_math=True)
    assert "libdevice.tanh(" in forward and "fast_tanh" not in forward


@pytest.mark.parametrize(
    "dtype, enabled, want",
    [
        (torch.float16, True, True),
        (torch.bfloat16, True, True),
        (torch.float32, True, False),
        (torch.bfloat16, False, False),
    ],
)
def test_the_option_and_the_input_dtype_decide(dtype, enabled, want):
    """The plan compiles the score mod with ``fast_math_for(options, dtype)``."""
    assert fast_math_for(KernelOptions(fast_math=enabled), dtype) is want
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    plan = plan_attention(
        _softcap, mask, 32, 32, 0.25, KernelOptions(fast_math=enabled), torch.device("cpu"), dtype
    )
    assert plan.score_mod.fn is compile_score_mod(_softcap, device="cpu", fast_math=want).fn


def test_the_option_is_validated():
    assert KernelOptions().fast_math is True
    with pytest.raises(ValueError, match=r"kernel_options\['fast_math'\] must be a bool, got 1"):
        KernelOptions.from_user({"fast_math": 1})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_half_precision_soft_cap_end_to_end():
    q, k, v = (torch.randn(1, 2, 48, 16).half() * 2 for _ in range(3))
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, _softcap, mask, kernel_options={"BACKEND": "TRITON"})
    gold, eager = gold_and_eager(q, k, v, score_mod=_softcap, block_mask=mask)
    assert_close_to_gold(out, gold.out, eager.out, name="out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tanh.approx.f32 runs on NVIDIA GPUs only")
def test_hardware_tanh_error_is_a_quarter_of_fp16_rounding_at_most():
    """Against float64 over a dense sweep (|x| up to 40, plus tiny values): relative error <= 2**-13."""
    from tests.compiler.harness import run_score

    def tanh(score, b, h, q_idx, kv_idx):
        return torch.tanh(score)

    kmod = compile_score_mod(tanh, device="cuda", fast_math=True)
    half = 1 << 15
    sweep = torch.cat([torch.linspace(-40, 40, half), torch.logspace(-30, 0, half)]).cuda()
    rows, cols = 16, 256  # one harness tile per launch
    index = torch.zeros(cols, dtype=torch.int32, device="cuda")
    tiles = sweep.reshape(-1, rows, cols)
    got = torch.stack([run_score(kmod, tile, 0, 0, index[:rows], index) for tile in tiles]).double()
    gold = torch.tanh(tiles.double())
    relative = ((got - gold).abs() / gold.abs().clamp_min(1e-30)).max().item()
    assert relative <= 2.0**-13, f"max relative error {relative:.3g} (2**{torch.tensor(relative).log2():.2f})"
