"""The Gluon Hopper forward (flexattn/kernels/hopper/forward_ws.py) compiles for sm_90a without a GPU.

CI has no Hopper GPU, so this checks what can be checked statically: the kernel compiles through
Triton's Gluon frontend for sm_90a (the stub driver of benchmarks/compile_report.py) with
flexattn's compiled mods inlined, fits in registers without spills and in shared memory, and uses
the Hopper paths it was written for: wgmma (SASS HGMMA), TMA loads (UTMALDG) and register
reallocation between producer and consumers (setmaxnreg). Correctness and speed are measured on the
GPU (tests/kernels/test_hopper_forward_gpu.py, benchmarks/spike_gluon_forward.py).
"""

from __future__ import annotations

import pytest
import torch

from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels.device import DeviceLimits
from flexattn.kernels.hopper.forward_ws import gluon_forward
from flexattn.kernels.paged_kv import PagedKV
from tests.kernels.hopper_cases import compile_in_child

H100_SHARED_MEMORY = 232448  # opt-in shared memory per block on sm_90
# (name, head dim, variant, length): no block mask with three consumers (E64) and two (E128); block
# tables (partial + full lists) with the compiled causal / document / ALiBi mods; lengths of 1000
# compile the tail paths (keys past KV_LEN masked, rows past Q_LEN clamped); the last field is the
# page size of a paged K/V cache (0: contiguous): a TMA box per page (16, 64) or per tile (256)
CASES = [
    ("E64-noop-3wg", 64, "noop", 1024, 0),
    ("E128-noop-2wg", 128, "noop", 1024, 0),
    ("E128-causal-tables", 128, "causal", 1024, 0),
    ("E64-document-tables", 64, "document", 1024, 0),
    ("E128-alibi-causal-tables", 128, "alibi", 1024, 0),
    ("E64-noop-tail-2wg", 64, "noop", 1000, 0),
    ("E128-causal-tables-tail", 128, "causal", 1000, 0),
    ("E128-causal-paged16", 128, "causal", 1024, 16),
    ("E64-causal-paged16-tail", 64, "causal", 1000, 16),
    ("E64-alibi-paged64", 64, "alibi", 1024, 64),
    ("E128-causal-paged256-tail", 128, "causal", 1000, 256),
]
_SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import gluon_compile_report as g
from compile_report import resources
rows = {}
for name, head_dim, variant, length, page in json.loads(sys.argv[1]):
    kernel = g.compile_variant(head_dim, variant, length=length, page=page)
    rows[name] = {**resources(kernel), **g.instructions(kernel)}
print("ROWS=" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled_rows() -> dict:
    """Every case of CASES compiled for sm_90a (one child process: real compiles, no interpreter)."""
    return compile_in_child(_SCRIPT, CASES)


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_compiles_for_sm90a_with_wgmma_tma_and_setmaxnreg_without_spills(compiled_rows, name):
    row = compiled_rows[name]
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
    assert 0 < row["shared_memory"] <= H100_SHARED_MEMORY, row
    assert row["ptx_wgmma"] > 0 and row["sass"].get("HGMMA", 0) > 0, row
    assert row["ptx_tma_loads"] > 0 and row["sass"].get("UTMALDG", 0) > 0, row
    assert ["dec", "24"] in row["ptx_setmaxnreg"] and row["sass"].get("USETMAXREG", 0) > 0, row
    assert row["sass"].get("LDL", 0) == 0 and row["sass"].get("STL", 0) == 0, row


def test_three_consumer_warpgroups_without_a_mask_at_e64_two_with_block_tables(compiled_rows):
    # setmaxnreg: three consumers get 160 registers each, two get 240 (the producer gives its back)
    assert ["inc", "160"] in compiled_rows["E64-noop-3wg"]["ptx_setmaxnreg"]
    assert ["inc", "240"] in compiled_rows["E64-document-tables"]["ptx_setmaxnreg"]
    assert ["inc", "240"] in compiled_rows["E64-noop-tail-2wg"]["ptx_setmaxnreg"]


H100 = DeviceLimits((9, 0), H100_SHARED_MEMORY)


@pytest.mark.parametrize(
    "q_shape, kv_shape, dtype, message",
    [
        ((1, 2, 256, 96), (1, 2, 256, 96), torch.bfloat16, "E = Ev in"),
        ((1, 2, 256, 64), (1, 2, 256, 64), torch.float32, "bf16/fp16"),
        ((1, 3, 256, 64), (1, 2, 256, 64), torch.bfloat16, "multiple of Hkv"),
    ],
    ids=["E96", "fp32", "H3-over-2"],
)
def test_launcher_refuses_what_the_kernel_cannot_do(q_shape, kv_shape, dtype, message):
    q, kv = torch.zeros(q_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
    mods = dict(
        score_mod=compile_score_mod(None, target="cuda"), mask_mod=compile_mask_mod(None, target="cuda")
    )
    with pytest.raises(ValueError, match=message):
        gluon_forward(q, kv, kv, **mods, tables=None, scale=0.125, target=H100, warmup=True)


def test_a_paged_tile_is_copied_a_page_at_a_time(compiled_rows):
    # 128-key tiles: one TMA box per tile over contiguous keys and over 256-row pages, one per page of
    # 16 rows (the PTX holds each copy of the unrolled tile loop)
    contiguous = compiled_rows["E128-causal-tables"]["ptx_tma_loads"]
    assert compiled_rows["E128-causal-paged256-tail"]["ptx_tma_loads"] == contiguous
    assert compiled_rows["E128-causal-paged16"]["ptx_tma_loads"] > 2 * contiguous


def test_launcher_refuses_pages_that_do_not_tile_its_key_tiles_and_paged_calls_without_a_mask():
    from flexattn.block_mask import create_block_mask

    q, cache = (
        torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16),
        torch.zeros(1, 1, 288, 64, dtype=torch.bfloat16),
    )
    paged = PagedKV(torch.arange(6, dtype=torch.int32)[None], 48, 256)
    mods = dict(
        score_mod=compile_score_mod(None, target="cuda"), mask_mod=compile_mask_mod(None, target="cuda")
    )
    tables = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 256, 256, device="cpu",
                               BLOCK_SIZE=(128, 384)).tables()  # fmt: skip
    with pytest.raises(ValueError, match="page_size=48"):
        gluon_forward(
            q, cache, cache, **mods, tables=tables, scale=0.125, target=H100, warmup=True, paged=paged
        )
    with pytest.raises(ValueError, match="under a block mask"):
        gluon_forward(
            q, cache, cache, **mods, tables=None, scale=0.125, target=H100, warmup=True, paged=paged
        )
