"""Backend choice (flexattn.dispatch): what AUTO picks for each device and dtype, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from flexattn.dispatch import choose_backend
from flexattn.options import KernelOptions

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
