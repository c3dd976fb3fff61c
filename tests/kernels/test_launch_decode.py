"""kernels/launch.py for the decode kernels: a repeat decode call launches the split and the merge
kernel without Triton's argument binding, passes each kernel's launcher exactly what Triton's own
path passes (the reused split workspace included), and goes back through Triton whenever something
it specialises on changes. The merge kernel's path (kernel_options DECODE_MERGE="KERNEL"): the
fused default's split kernel takes the call's outputs, as the merge kernel does here;
tests/test_host_path.py repeats the fused default.

As ``test_launch.py`` does for the forward: the kernels are compiled for sm_90a in a fresh process
without the interpreter, against a stub driver whose launcher records its arguments.
"""

from __future__ import annotations

import pytest

from tests.kernels.launch_probe import run_probe

PROBE = r'''
import flexattn.compiler as mod_compiler
from flexattn import Positions, create_block_mask, dispatch, flex_attention, plan
from flexattn.kernels import decode
from flexattn.kernels.device import DeviceLimits

bound = []
real_run = triton_jit.JITFunction.run


def counted(self, *args, **kwargs):
    bound.append(self.fn.__name__)
    return real_run(self, *args, **kwargs)


hopper = DeviceLimits((9, 0), 232448, 132)
report = {}
with (
    mock.patch.object(triton_jit.JITFunction, "run", counted),
    mock.patch.object(decode, "device_limits", lambda device: hopper),
    mock.patch.object(plan, "device_limits", lambda device: hopper),
    mock.patch.object(mod_compiler, "_target", lambda device, program: "cuda"),
    mock.patch.object(dispatch, "choose_backend", lambda *a, **k: "TRITON"),
):
    options = {"BACKEND": "TRITON", "DECODE_MERGE": "KERNEL"}  # (the two-launch path: merge args elided)
    B, HQ, HKV, L, E = 2, 4, 2, 256, 64
    q = torch.randn(B, HQ, 1, E, dtype=torch.float16)
    k, v = (torch.randn(B, HKV, L, E, dtype=torch.float16) for _ in range(2))
    slopes = torch.randn(HQ)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device="cpu", BLOCK_SIZE=64)

    def call(query=q, positions=None, score_mod=alibi):
        """One decode call: the kernels Triton bound, and each launch as data (merge outputs elided)."""
        del launched[:]
        before = len(bound)
        positions = positions or Positions(q_offset=L - 1)
        out = flex_attention(query, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                             kernel_options=options, positions=positions)
        launches = {}
        for name, args in launched:
            kernel_args = [describe(a) for a in args[9:]]
            if name.startswith("_decode_merge"):
                kernel_args[3:6] = ["output"] * 3  # out, lse, max_scores: new tensors every call
            launches[name] = {"head": describe(args[:6]), "hooks": [type(a).__name__ for a in args[6:9]],
                              "args": kernel_args}
        return {"bound": bound[before:], "launches": launches, "out": out}

    first, second = call(), call()
    report["kernels"] = sorted(first["launches"])
    report["bound"] = [first["bound"], second["bound"]]

    def same(one, other):
        """The same kernels, grids, streams and arguments (the hooks aside: only Triton passes them)."""
        return sorted(one) == sorted(other) and all(
            one[n]["head"] == other[n]["head"] and one[n]["args"] == other[n]["args"] for n in one
        )

    report["same_launch"] = same(first["launches"], second["launches"])
    decode._SPLIT_LAUNCHES.clear()
    decode._MERGE_LAUNCHES.clear()
    slow, fast = call(), call()
    report["slow_then_fast"] = [len(slow["bound"]), len(fast["bound"])]
    report["fast_equals_triton"] = same(slow["launches"], fast["launches"])
    report["hooks"] = {name: [slow["launches"][name]["hooks"], fast["launches"][name]["hooks"]]
                       for name in slow["launches"]}

    moved = call(positions=Positions(q_offset=L - 2))  # a new offset: the same kernel, the new value
    split = next(v for n, v in moved["launches"].items() if n.startswith("_decode_split"))
    report["new_offset"] = [len(moved["bound"]), L - 2 in split["args"]]

    lengths = torch.tensor([L, L // 3], dtype=torch.int32)
    ragged = [call(positions=Positions(q_offset=lengths - 1, kv_lengths=lengths)) for _ in range(2)]
    lengths = torch.tensor([L // 2, L], dtype=torch.int32)  # a new tensor of the same kind
    rebound = call(positions=Positions(q_offset=lengths - 1, kv_lengths=lengths))
    passed = [v["args"] for v in rebound["launches"].values()]
    report["ragged"] = [len(ragged[0]["bound"]), len(ragged[1]["bound"]), len(rebound["bound"]),
                        all(["tensor", id(lengths)] in a for a in passed)]

    slopes = torch.randn(HQ)  # a new captured tensor: its pointer in the score mod's argument tuple
    recaptured = call()
    split = next(v for n, v in recaptured["launches"].items() if n.startswith("_decode_split"))
    report["new_capture"] = [len(recaptured["bound"]),
                             any(isinstance(a, list) and ["tensor", id(slopes)] in a for a in split["args"])]

    storage = torch.randn(B * HQ * E + 1, dtype=torch.float16)
    misaligned = storage[1:].view(B, HQ, 1, E)  # 2 bytes off a 16-byte boundary
    report["misaligned"] = [call(misaligned)["bound"], call(misaligned)["bound"]]

    from flexattn.paged import PagedAttention

    paged = PagedAttention(2 * L // 16 + 4, 16, B, device="cpu")
    for b in range(B):
        paged.reserve(b, L)
    k_cache = torch.zeros(1, HKV, (2 * L // 16 + 4) * 16, E, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    paged_mask = paged.convert_logical_block_mask(mask, torch.arange(B))

    def paged_call():
        del launched[:]
        before = len(bound)
        flex_attention(q, k_cache, v_cache, block_mask=paged_mask, enable_gqa=True, kernel_options=options,
                       positions=Positions(q_offset=L - 1))
        split = next(describe(a) for n, a in launched if n.startswith("_decode_split"))
        return bound[before:], ["tensor", id(paged_mask.kv_pages.page_table)] in split[9:]

    report["paged"] = [paged_call(), paged_call()]

    knobs.runtime.launch_enter_hook.add(lambda metadata: None)
    report["hooked"] = [len(call()["bound"]), len(call()["bound"])]
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def report():
    return run_probe(PROBE)


SPLIT, MERGE = "_decode_split_kernel", "_decode_merge_kernel"


def test_a_decode_call_launches_the_split_and_the_merge_kernel(report):
    assert [name.rsplit("_kernel", 1)[0] + "_kernel" for name in report["kernels"]] == [MERGE, SPLIT]


def test_a_repeat_decode_call_is_not_bound_again(report):
    assert report["bound"] == [[SPLIT, MERGE], []]
    assert report["slow_then_fast"] == [2, 0]


def test_the_direct_launches_pass_what_triton_passes(report):
    # the split workspace is the same tensor every call, so the split kernel's arguments agree whole
    assert report["same_launch"] and report["fast_equals_triton"]
    for hooks in report["hooks"].values():  # Triton passes its (empty) hook chains; the direct launch none
        assert hooks == [["LazyDict", "HookChain", "HookChain"], ["NoneType"] * 3]


def test_new_positions_and_captures_of_the_same_kind_reuse_the_kernels(report):
    assert report["new_offset"] == [0, True]
    # per-sequence offsets and lengths are another specialisation (bound once), then new tensors hit
    assert report["ragged"] == [2, 0, 0, True]
    assert report["new_capture"] == [0, True]


def test_a_change_triton_specialises_on_binds_once_then_hits(report):
    assert report["misaligned"] == [[SPLIT], []]  # q off 16-byte alignment: only the split kernel reads q


def test_a_paged_cache_binds_once_then_hits_with_its_page_table(report):
    assert report["paged"] == [[[SPLIT], True], [[], True]]  # (the merge kernel reads no K/V: no new key)


def test_launch_hooks_see_every_launch(report):
    assert report["hooked"] == [2, 2]
