"""The Gluon Hopper backward (flexattn/kernels/hopper/backward_ws.py) compiles for sm_90a without a GPU.

What can be checked statically (the stub driver of benchmarks/compile_report.py): the kernel builds
through Gluon for sm_90a with flexattn's compiled mods inlined, fits in shared memory and uses the
Hopper paths it was written for (wgmma, TMA loads, setmaxnreg, vector fp32 reductions for dQ), and
the launcher refuses what it cannot run. Correctness and speed are measured on the GPU
(tests/kernels/test_hopper_backward_gpu.py, benchmarks/spike_gluon_backward.py).
"""

from __future__ import annotations

import pytest
import torch

from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.hopper.backward_ws import gluon_backward
from flexattn.variants import tanh_softcap
from tests.kernels.hopper_cases import compile_in_child

H100 = DeviceLimits((9, 0), 232448)
# (name, head dim, variant, length, gluon_backward keywords): dense and block-table kernels, tails
# (1000); the forms not (yet) the default: "tma-dq<cols>", dQ by TMA bulk reductions of [64, cols]
# boxes; "late-dp", dP's GEMM after P
CASES = [
    ("E64-noop", 64, "noop", 1024, {}),
    ("E64-noop-tma-dq32", 64, "noop", 1024, {"tma_dq": True, "dq_box_cols": 32}),
    ("E64-causal-tail-tma-dq64", 64, "causal", 1000, {"tma_dq": True, "dq_box_cols": 64}),
    ("E64-causal-tail", 64, "causal", 1000, {}),
    ("E128-noop", 128, "noop", 1024, {}),
    ("E128-noop-tma-dq64", 128, "noop", 1024, {"tma_dq": True, "dq_box_cols": 64}),
    ("E128-alibi", 128, "alibi", 1024, {}),
    ("E128-causal-tail-per-warpgroup", 128, "causal", 1000, {"shared_ds": False}),
    ("E128-causal-late-dp", 128, "causal", 1024, {"late_dp": True}),
]
_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import gluon_compile_report as g
from compile_report import resources, sass_text
rows = {}
for name, head_dim, variant, length, launch in json.loads(sys.argv[1]):
    kernel = g.compile_backward(head_dim, variant, length=length, **launch)
    sass = sass_text(kernel)
    rows[name] = {**resources(kernel), **g.instructions(kernel), "red_v4": sass.count("REDG.E.ADD.F32x4"),
                  "red_v2": sass.count("REDG.E.ADD.F32x2"), "tma_red": sass.count("UTMAREDG")}
print("ROWS=" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled_rows() -> dict:
    """Every case of CASES compiled for sm_90a (one child process: real compiles, no interpreter)."""
    return compile_in_child(_SCRIPT, CASES)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_backward_compiles_for_sm90a_with_wgmma_tma_setmaxnreg_and_vector_reductions(compiled_rows, name):
    row = compiled_rows[name]
    assert 0 < row["shared_memory"] <= H100.shared_memory, row
    assert row["ptx_wgmma"] > 0 and row["sass"].get("HGMMA", 0) > 0, row
    assert row["ptx_tma_loads"] > 0 and row["sass"].get("UTMALDG", 0) > 0, row
    assert ["inc", "240"] in row["ptx_setmaxnreg"] and ["dec", "24"] in row["ptx_setmaxnreg"], row
    # dQ's sums: TMA bulk reductions where asked (no per-thread ones), else 4-wide per-thread reductions at
    # E64 (through a layout conversion), 2-wide at E128
    if "tma-dq" in name:
        assert row["tma_red"] > 0 and row["red_v2"] == row["red_v4"] == 0, row
    elif name.startswith("E64"):
        assert row["red_v4"] > 0 and row["tma_red"] == 0, row
    else:
        assert row["red_v2"] > 0 and row["red_v4"] == row["tma_red"] == 0, row
    if name.startswith("E64"):  # (E128's accumulators leave spills outside the inner loop)
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def _mods(score=None):
    return dict(
        score_mod=compile_score_mod(score, target="cuda"), mask_mod=compile_mask_mod(None, target="cuda")
    )


@pytest.mark.parametrize(
    "q_shape, kv_shape, dtype, score, message",
    [
        ((1, 2, 256, 96), (1, 2, 256, 96), torch.bfloat16, None, "E = Ev in"),
        ((1, 2, 256, 64), (1, 2, 256, 64), torch.float32, None, "bf16/fp16"),
        ((1, 2, 256, 64), (1, 2, 256, 64), torch.bfloat16, tanh_softcap(20.0), "identity or additive"),
    ],
    ids=["E96", "fp32", "softcap"],
)
def test_backward_launcher_refuses_what_the_kernel_cannot_do(q_shape, kv_shape, dtype, score, message):
    q, kv = torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
    lse = torch.zeros(q_shape[:3])
    with pytest.raises(ValueError, match=message):
        gluon_backward(
            q, kv, kv, q, lse, q, None, **_mods(score), tables=None, scale=0.125, target=H100, warmup=True
        )


@pytest.mark.parametrize("cols", [48, 16, 256])
def test_backward_launcher_refuses_dq_boxes_that_do_not_tile_the_head_dim(cols):
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dq_box_cols must be 32 or 64"):
        gluon_backward(q, q, q, q, torch.zeros(1, 2, 256), q, None, **_mods(), tables=None, scale=0.125,
                       tma_dq=True, dq_box_cols=cols, target=H100, warmup=True)  # fmt: skip


def test_backward_launcher_refuses_other_gpus():
    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sm_90"):
        gluon_backward(q, q, q, q, torch.zeros(1, 2, 256), q, None, **_mods(), tables=None, scale=0.125,
                       target=DeviceLimits((8, 0), 166912), warmup=True)  # fmt: skip


def test_a_ptxas_failure_of_the_shared_ds_form_is_remembered_and_the_per_warpgroup_form_runs(monkeypatch):
    # Triton does not cache a failed build: without the memory every call would run ptxas again
    import triton

    import flexattn.kernels.hopper.backward_ws as bw

    built = []

    class Kernel:  # stands in for the jit kernel: the shared-dS build "crashes ptxas"
        def __getitem__(self, grid):
            def launch(*args, **meta):
                built.append(meta["SHARED_DS"])
                if meta["SHARED_DS"]:
                    raise triton.runtime.errors.PTXASError("ptxas died with SIGSEGV")

            return launch

    class Preprocess:
        def __getitem__(self, grid):
            return lambda *args, **meta: None

    monkeypatch.setattr(bw, "_gluon_backward_kernel", Kernel())
    monkeypatch.setattr(bw, "_bwd_preprocess", Preprocess())
    monkeypatch.setattr(bw, "PTXAS_FAILURES", set())
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    for _ in range(3):
        dq, dk, dv = gluon_backward(q, q, q, q, torch.zeros(1, 2, 256), q, None, **_mods(), tables=None,
                                    scale=0.125, target=H100)  # fmt: skip
        assert dq.shape == q.shape and dk.shape == q.shape
    assert built == [True, False, False, False]
