"""Backend choice (flexattn.dispatch): what AUTO picks for each device and dtype, and clear refusals."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from flexattn.dispatch import choose_backend
from flexattn.options import KernelOptions, KernelOptionsWarning

CUDA = torch.device("cuda")  # only a device object: nothing runs on it


@pytest.mark.parametrize(
    "dtype, backend",
    [
        (torch.float16, "TRITON"),
        (torch.bfloat16, "TRITON"),
        (torch.float32, "TRITON"),
        (torch.float64, "REFERENCE"),
    ],
    ids=["fp16", "bf16", "fp32", "fp64"],
)
def test_auto_on_cuda_runs_the_kernels_for_the_dtypes_they_support(dtype, backend):
    assert choose_backend(CUDA, KernelOptions(), dtype) == backend


def test_triton_backend_refuses_float64_with_a_fix():
    with pytest.raises(ValueError, match=r"float64.*BACKEND.*REFERENCE"):
        choose_backend(CUDA, KernelOptions(BACKEND="TRITON"), torch.float64)


KERNEL_ONLY_CASES = [
    {"PREFILL_KERNEL": "GLUON"},
    {"BACKWARD_KERNEL": "GLUON"},
    {"DECODE_MERGE": "KERNEL"},
    {"BLOCK_M": 64, "BLOCK_N": 32},
    {"num_warps": 8},
    {"bwd_BLOCK_M1": 32},
    {"USE_TMA": True},
    {"autotune": True},
]


@pytest.mark.parametrize("options", KERNEL_ONLY_CASES, ids=lambda o: "-".join(o))
@pytest.mark.parametrize(
    "device, dtype, backend, why",
    [
        (torch.device("cpu"), torch.float32, {}, "the CPU backend (tensors on cpu)"),
        (torch.device("cpu"), torch.float64, {}, "the REFERENCE backend (float64 inputs)"),
        (
            torch.device("cpu"),
            torch.float32,
            {"BACKEND": "CPU"},
            "the CPU backend (kernel_options BACKEND='CPU')",
        ),
        (
            CUDA,
            torch.bfloat16,
            {"BACKEND": "REFERENCE"},
            "the REFERENCE backend (kernel_options BACKEND='REFERENCE')",
        ),
        (CUDA, torch.float64, {}, "the REFERENCE backend (float64 inputs)"),
    ],
    ids=["cpu-auto", "fp64-auto", "cpu-forced", "cuda-reference", "cuda-fp64"],
)
def test_options_only_the_gpu_kernels_read_are_named_where_they_would_do_nothing(
    options, device, dtype, backend, why
):
    # the same warning, naming each option and its value, on every backend that has no such knob
    chosen = KernelOptions.from_user({**backend, **options})
    named = ", ".join(f"{k}={getattr(chosen, k)!r}" for k in options)
    message = f"kernel_options {named} configure the GPU kernels, but this call runs {why}"
    with pytest.warns(KernelOptionsWarning, match=re.escape(message)):
        assert choose_backend(device, chosen, dtype) in ("CPU", "REFERENCE")
    with warnings.catch_warnings():  # the kernels read them: no warning
        warnings.simplefilter("error")
        assert choose_backend(CUDA, KernelOptions.from_user(options), torch.bfloat16) == "TRITON"


def test_a_cpu_call_with_gpu_options_runs_and_says_they_did_nothing():
    import flexattn

    q = torch.randn(1, 2, 64, 16)
    with pytest.warns(KernelOptionsWarning, match="BLOCK_M=32 configure the GPU kernels.*CPU backend"):
        out = flexattn.flex_attention(q, q, q, kernel_options={"BLOCK_M": 32})
    torch.testing.assert_close(out, flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": "REFERENCE"}))


@pytest.mark.parametrize(
    "options",
    [
        {"fast_math": False},
        {"deterministic": True},
        {"ROWS_GUARANTEED_SAFE": True},
        {"OUTPUT_LOGSUMEXP": True},
    ],
)
def test_options_every_backend_reads_run_on_cpu_without_a_warning(options):
    import flexattn

    q = torch.randn(1, 2, 64, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelOptionsWarning)
        assert choose_backend(q.device, KernelOptions.from_user(options), q.dtype) == "CPU"
        out = flexattn.flex_attention(q, q, q, kernel_options=options)
    torch.testing.assert_close(out, flexattn.flex_attention(q, q, q, kernel_options={"BACKEND": "REFERENCE"}))
