"""Generated device functions equal eager (vmap) evaluation of the mod: values and gradients.

Every catalog mod and a zoo of mods covering the supported surface run through the harness
kernels (Triton's interpreter on CPU) on one random tile: random b, h, random query/key indices
and random scores. Score values and gradients are judged three ways (float64 eager = gold, float32
eager, generated code); masks must match exactly. Gradients are checked in both tile orientations
(query rows as in a forward/dQ kernel, key rows as in a dK/dV kernel).
"""

from __future__ import annotations

import os

import pytest
import torch

from flexattn.compiler import compile_mask_mod, compile_score_mod, explain, fast_tanh
from tests.catalog import CATALOG
from tests.compiler.harness import eager_mask, eager_score, run_grad, run_mask, run_score
from tests.helpers import DEFAULT_FLOOR, assert_close_to_gold

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU",
)
# the interpreter runs on CPU tensors; without it the kernels need CUDA (and the module is skipped
# on a machine with neither, so building the zoo below must not touch CUDA there)
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
M, N = 16, 8  # tile: query rows x key columns (different sizes catch axis mix-ups)


class Tile:
    """Random tile inputs for a problem of shape (B, H, Lq, Lkv)."""

    def __init__(self, B=None, H=None, Lq=None, Lkv=None):
        draw = lambda lo, hi: int(torch.randint(lo, hi + 1, ()))
        self.B, self.H = B or draw(1, 3), H or draw(1, 4)
        self.Lq, self.Lkv = Lq or draw(9, 70), Lkv or draw(9, 70)
        self.b, self.h = draw(0, self.B - 1), draw(0, self.H - 1)
        self.q_idx = torch.randint(0, self.Lq, (M,), dtype=torch.int32, device=DEVICE)
        self.kv_idx = torch.randint(0, self.Lkv, (N,), dtype=torch.int32, device=DEVICE)
        self.score = torch.randn(M, N, device=DEVICE) * 3
        self.dout = torch.randn(M, N, device=DEVICE)

    def indices(self):
        return self.b, self.h, self.q_idx, self.kv_idx


def check_score_mod(mod, tile: Tile, params=(), floor=None) -> None:
    """Values, dLoss/dscore and capture gradients of ``mod`` against eager autograd."""
    for p in params:
        p.requires_grad_(True)
    kmod = compile_score_mod(mod, device=DEVICE)

    got = run_score(kmod, tile.score, *tile.indices())
    gold = eager_score(mod, tile.score.double(), *tile.indices())
    eager = eager_score(mod, tile.score, *tile.indices())
    assert got.dtype == torch.float32 and got.shape == (M, N)
    assert_close_to_gold(got, gold.detach(), eager.detach(), floor=floor, name="score")

    gold_grads = _eager_grads(mod, tile.score.double(), tile, params)
    eager_grads = _eager_grads(mod, tile.score, tile, params)
    sum_floors = _fp32_sum_floors(mod, tile, params, gold_grads[1:])
    for transposed in (False, True):
        buffers = tuple(torch.zeros(t.shape, device=DEVICE) for t in kmod.grad_captures)
        dscore = run_grad(kmod, tile.score, *tile.indices(), tile.dout, buffers, transposed=transposed)
        assert_close_to_gold(
            dscore, gold_grads[0], eager_grads[0], floor=floor, name=f"dscore transposed={transposed}"
        )
        # captures may be tensors computed from params (weight * weight): autograd carries their grads on
        ours = _chain(kmod.grad_captures, buffers, params)
        for i, (g_ours, g, e) in enumerate(zip(ours, gold_grads[1:], eager_grads[1:])):
            name = f"grad of param {i} transposed={transposed}"
            assert_close_to_gold(g_ours, g, e, floor=sum_floors[i], name=name)


def _chain(captures, buffers, params) -> list[torch.Tensor]:
    """Gradients of ``params`` given the gradients ``buffers`` of the captures computed from them."""
    if not params:
        return []
    if not captures:
        return [torch.zeros_like(p) for p in params]
    cotangents = [b.to(c.dtype) for b, c in zip(buffers, captures)]
    grads = torch.autograd.grad(captures, params, cotangents, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _fp32_sum_floors(mod, tile: Tile, params, gold_grads) -> list[float]:
    """Per param, the floor for its gradient: the error bound of the fp32 sum the kernel computes.

    A param's gradient is an inner product over the tile, ``sum_ij dout_ij * d mod_ij / d param``,
    which the kernel sums in fp32 in an order of its own (tile reductions, then atomics). Any order
    of n fp32 additions of products errs by at most gamma_n * sum_ij |dout_ij * d mod_ij / d param|
    (gamma_n = n u / (1 - n u), u = 2**-24; Higham, Accuracy and Stability, 3.1). Eager PyTorch on
    CPU accumulates fp32 sums in double, so err(eager) can be exactly 0 and cannot stand in for
    this. The bound is normalised like ``rel_err`` (by max |gold|) and added to the default floor.
    """
    default = DEFAULT_FLOOR[torch.float32]
    out = eager_score(mod, tile.score.double(), *tile.indices())  # (M, N) float64
    if not params or not out.requires_grad:
        return [default] * len(params)
    n, u = M * N, 2.0**-24
    gamma = n * u / (1 - n * u)
    one_hot = torch.eye(n, dtype=out.dtype, device=out.device).reshape(n, M, N)
    # d out_ij / d param for every tile element ij: each (n, *param.shape)
    jacobians = torch.autograd.grad(out, params, one_hot, allow_unused=True, is_grads_batched=True)
    floors = []
    for jacobian, p, gold in zip(jacobians, params, gold_grads):
        if jacobian is None:
            floors.append(default)
            continue
        dout = tile.dout.double().reshape(n, *([1] * p.dim()))
        abs_sum = (dout * jacobian.double()).abs().sum(0).max().item()  # max over param elements
        floors.append(default + gamma * abs_sum / max(gold.abs().max().item(), 1e-30))
    return floors


def _eager_grads(mod, score, tile: Tile, params) -> list[torch.Tensor]:
    score = score.clone().requires_grad_(True)
    out = eager_score(mod, score, *tile.indices())
    inputs = [score, *params]
    if not out.requires_grad:
        return [torch.zeros_like(t, dtype=score.dtype) for t in inputs]
    grads = torch.autograd.grad(out, inputs, tile.dout.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, inputs)]


def check_mask_mod(mod, tile: Tile) -> None:
    kmod = compile_mask_mod(mod, device=DEVICE)
    got = run_mask(kmod, *tile.indices())
    want = eager_mask(mod, *tile.indices())
    assert torch.equal(got, want.expand(M, N)), f"mask differs at {(got != want).nonzero().tolist()[:5]}"


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_mod_matches_eager(name):
    tile = Tile()
    mods = CATALOG[name](tile.B, tile.H, tile.Lq, tile.Lkv, DEVICE)
    if mods.score_mod is not None:
        check_score_mod(mods.score_mod, tile, mods.params)
    if mods.mask_mod is not None:
        check_mask_mod(mods.mask_mod, tile)


def test_none_mods_are_identity_and_always_true():
    tile = Tile()
    kmod = compile_score_mod(None, device=DEVICE)
    assert torch.equal(run_score(kmod, tile.score, *tile.indices()), tile.score)
    assert torch.equal(run_grad(kmod, tile.score, *tile.indices(), tile.dout), tile.dout)
    assert bool(run_mask(compile_mask_mod(None, device=DEVICE), *tile.indices()).all())


def test_trivial_mods_are_flagged_for_the_launchers():
    import flexattn
    from flexattn import variants

    assert compile_score_mod(None, device=DEVICE).trivial
    assert compile_score_mod(lambda s, b, h, q, kv: s, device=DEVICE).trivial
    assert compile_mask_mod(None, device=DEVICE).trivial
    assert compile_mask_mod(flexattn.noop_mask, device=DEVICE).trivial
    assert not compile_score_mod(lambda s, b, h, q, kv: s * 2.0, device=DEVICE).trivial
    assert not compile_mask_mod(variants.causal(), device=DEVICE).trivial
    assert not compile_mask_mod(lambda b, h, q, kv: q >= 0, device=DEVICE).trivial


def test_light_score_mods_are_flagged_for_the_launchers():
    from flexattn import variants

    table = torch.zeros(4, 33, requires_grad=True)

    def learnable(score, b, h, q_idx, kv_idx):
        return score + table[h, (kv_idx - q_idx).clamp(-16, 16) + 16]

    assert compile_score_mod(None, device=DEVICE).light
    assert compile_score_mod(variants.alibi(4), device=DEVICE).light
    assert not compile_score_mod(variants.tanh_softcap(30.0), device=DEVICE).light
    assert not compile_score_mod(lambda s, b, h, q, kv: s / (1 + (q - kv).abs()), device=DEVICE).light
    assert not compile_score_mod(learnable, device=DEVICE).light  # gradient atomics need registers
    assert not compile_mask_mod(variants.causal(), device=DEVICE).light


# ---- a zoo of score mods covering the supported surface ----------------------------------------


class _LearnableRelativeBias(torch.nn.Module):
    """A mod that is an nn.Module holding a learnable table (negative offsets wrap to the end)."""

    def __init__(self, heads: int, span: int, device) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(heads, span, device=device))

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, q_idx - kv_idx]


def _zoo(tile: Tile):
    """id -> (score_mod, learnable params); built per test so captures are fresh."""
    Lq, Lkv, H = tile.Lq, tile.Lkv, tile.H
    bias16 = torch.randn(H, Lq + Lkv, device=DEVICE).to(torch.float16)
    table3 = torch.randn(tile.B, H, 5, device=DEVICE)
    rows = torch.randn(Lq, 3, device=DEVICE)
    ids64 = torch.randint(-3, 4, (Lkv,), dtype=torch.int64, device=DEVICE)
    flags = torch.rand(Lq, device=DEVICE) > 0.5
    small = torch.randint(-100, 100, (H, Lkv), dtype=torch.int8, device=DEVICE)
    counts = torch.randint(0, 255, (Lq,), dtype=torch.uint8, device=DEVICE)
    precise = torch.randn(Lq, dtype=torch.float64, device=DEVICE)
    weight = torch.rand((), device=DEVICE) + 0.5
    slopes = torch.rand(H, device=DEVICE)
    cap = 7.5

    def arithmetic(s, b, h, q, kv):
        d = q - kv
        return (s * 2 - 1.5) / 3 + d * 0.25 - (d // 3) * 0.5 + (d % 5) * 0.125 + (-s) + 2 ** (d % 3)

    def integer_semantics(s, b, h, q, kv):
        d = q - kv  # negative half the time: floor division and Python-style modulo
        return (
            s + (d // 4).float() + (d % 3).float() * 10 + (7 // (d.abs() + 1)).float() + ((-d) % -4).float()
        )

    def unary_functions(s, b, h, q, kv):
        x = s.abs() + 0.1
        return (
            torch.exp(s * 0.1) + torch.exp2(s * 0.1) + torch.log(x) + torch.log2(x) + torch.log1p(x)
            + torch.expm1(s * 0.1) + torch.tanh(s) + torch.sigmoid(s) + torch.sqrt(x) + torch.rsqrt(x)
            + torch.sin(s) + torch.cos(s) + torch.erf(s) + s.abs() + torch.sign(s)
        )  # fmt: skip

    def rounding(s, b, h, q, kv):
        half = (q - kv).float() * 0.5  # exact ties: round half to even
        return (
            torch.floor(s)
            + torch.ceil(s) * 2
            + torch.round(half) * 3
            + torch.trunc(s) * 4
            + s.round() * 5
            + s
        )

    def powers(s, b, h, q, kv):
        x = s.abs() + 0.5
        return s**2 + s**3 + x**0.5 + x**-1 + x**-0.5 + x**1.7 + x ** (s * 0.1) + 0.5 ** (s * 0.3)

    def comparisons_and_logic(s, b, h, q, kv):
        a, c = q > kv, (q + kv) % 3 == 0
        mixed = (a & c) | (a ^ c) | ~(q <= 2) | torch.logical_and(a, c) | torch.logical_or(c, q != kv)
        both = torch.logical_xor(a, torch.logical_not(c)) & (s >= 0) & (s < 2.5) & (s != 1.0) & (kv == kv)
        return (
            torch.where(mixed, s, -s)
            + both.float()
            + ((q << 1) + (kv >> 1) + (q & 7) + (kv | 2) + (q ^ kv)) * 0.01
        )

    def clamps_and_extrema(s, b, h, q, kv):
        return (
            torch.clamp(s, -1.0, 2.0) + s.clamp(min=0.5) + torch.clamp_max(s, 1.0) + torch.clamp_min(s, -0.5)
            + torch.maximum(s, (q - kv).float() * 0.1) + torch.minimum(s, 0.3 * s * s)
            + torch.relu(s) + torch.clip(s, max=0.0) + torch.max(s, s * 0.5) + torch.min(s, -s)
        )  # fmt: skip

    def casts_and_constants(s, b, h, q, kv):
        # (bf16 of values it represents exactly: Triton's interpreter truncates when rounding to bf16)
        # (detached: eager autograd would round the gradient to fp16, ours stays fp32)
        low = s.detach().to(torch.float16) * 3 + s.detach().half() - torch.round(s * 4).to(torch.bfloat16)
        ints = s.int() + s.long() * 2 + (s > 0).int() + torch.ones_like(q) + torch.full_like(s, 2.0).int()
        consts = torch.tensor(0.5) * s + torch.zeros_like(s) + torch.tensor(3) * q + s.new_tensor(1.25)
        flags = s.bool().float() + (s > 1).float() * True + (q > kv) * 0.5 + False
        return (
            low.float()
            + ints.float()
            + consts
            + s.type_as(s) * torch.ones_like(s)
            + s.double().float()
            + flags
        )

    def nan_and_inf_tests(s, b, h, q, kv):
        x = torch.where(q > kv, s, float("inf"))
        y = torch.where(kv % 4 == 0, float("nan"), s)
        return torch.isinf(x).float() + torch.isnan(y).float() * 2 + torch.isfinite(x).float() * 3 + s

    def softcap_fast_tanh(s, b, h, q, kv):
        return cap * fast_tanh(s / cap)

    def half_precision_bias(s, b, h, q, kv):
        return s + bias16[h, q - kv + Lkv] * 0.5

    def rank3_partial_index(s, b, h, q, kv):
        row = table3[b, h]
        return s * row[(q + kv) % 5] + rows[q][kv % 3]

    def integer_bool_and_double_captures(s, b, h, q, kv):
        ints = ids64[kv] * (q % 2) + ids64[kv - 1] + small[h, kv] + counts[q] // 7
        return s + ints + torch.where(flags[q], 1.0, -1.0) + (flags[q] & (kv > 3)) * 0.5 + precise[q] * s

    def real_tensor_on_the_left(s, b, h, q, kv):
        w, n = weight.detach(), torch.tensor(3, dtype=torch.int32, device=DEVICE)
        ints = (n & q) + (n // (q + 1)) + (n % (q + 1)) + (n | kv) + (n ^ q) + (n - q)
        return (w - s) + w / (s.abs() + 1) + w ** (s * 0.1) + (w > s) + (w == s) + torch.rsub(s, 1.0) + ints

    def learnable_scalar_and_slopes(s, b, h, q, kv):
        return s * weight - slopes[h] * (q - kv).abs() + weight * weight * 0.1

    def divisions(s, b, h, q, kv):
        d = (q - kv).float()
        return (
            s / 8
            + s / 3
            + d / (s.abs() + 1)
            + torch.div(d, 2, rounding_mode="floor")
            + torch.div(d, 3, rounding_mode="trunc")
            + torch.remainder(s, 0.75)
            + torch.floor_divide(d, 0.6)
        )

    module = _LearnableRelativeBias(H, Lq + Lkv, DEVICE)
    leaf = torch.randn(Lkv, H, device=DEVICE, requires_grad=True)
    leaf_view = leaf.t()  # non-contiguous capture (strides (1, H)); gradients go through the view

    def transposed_view(s, b, h, q, kv):
        return s + leaf_view[h, kv] * (q % 3)

    return {
        "module-with-parameter": (module, (module.table,)),
        "transposed-view": (transposed_view, (leaf,)),
        "arithmetic": (arithmetic, ()),
        "integer-semantics": (integer_semantics, ()),
        "unary-functions": (unary_functions, ()),
        "rounding": (rounding, ()),
        "powers": (powers, ()),
        "comparisons-and-logic": (comparisons_and_logic, ()),
        "clamps-and-extrema": (clamps_and_extrema, ()),
        "casts-and-constants": (casts_and_constants, ()),
        "nan-and-inf-tests": (nan_and_inf_tests, ()),
        "softcap-fast-tanh": (softcap_fast_tanh, ()),
        "half-precision-bias": (half_precision_bias, (bias16,)),
        "rank3-partial-index": (rank3_partial_index, (table3, rows)),
        "integer-bool-and-double-captures": (integer_bool_and_double_captures, ()),
        "learnable-scalar-and-slopes": (learnable_scalar_and_slopes, (weight, slopes)),
        "real-tensor-on-the-left": (real_tensor_on_the_left, ()),
        "divisions": (divisions, ()),
    }


ZOO = list(_zoo(Tile(B=1, H=1, Lq=9, Lkv=9)))


def _check_zoo(name):
    tile = Tile()
    mod, params = _zoo(tile)[name]
    # tanh.approx.f32 on GPUs: relative error up to ~2**-11 (the interpreter computes exact tanh)
    floor = 2e-3 if name == "softcap-fast-tanh" and DEVICE == "cuda" else None
    check_score_mod(mod, tile, [p for p in params if p.dtype == torch.float32], floor=floor)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_mod_matches_eager(name):
    _check_zoo(name)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled GPU code (run without TRITON_INTERPRET)")
def test_gpu_compiled_mods_match_eager():
    """Every catalog and zoo mod compiled for the GPU (libdevice, inline-asm tanh, atomics)."""
    for name in CATALOG:
        test_catalog_mod_matches_eager(name)
    for name in ZOO:
        _check_zoo(name)
    test_division_is_exact_where_it_decides_a_mask()
    test_division_feeding_only_the_score_is_a_multiplication()
    test_log_buckets_decide_mask_bits_like_eager()
    test_index_arithmetic_is_int64_only_for_huge_captures()
    test_fixed_point_gradient_buffers()
    test_document_mask_from_offsets_by_binary_search()


def test_fixed_point_gradient_buffers():
    """int64 buffers with a scaled dout (the backward kernels' deterministic mode) give the same sums."""
    tile = Tile()
    bias = torch.randn(tile.H, tile.Lq + tile.Lkv, device=DEVICE, requires_grad=True)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + tile.Lkv]

    kmod = compile_score_mod(rel_bias, device=DEVICE)
    scale = 2.0**32
    fixed = torch.zeros(bias.shape, dtype=torch.int64, device=DEVICE)
    run_grad(kmod, tile.score, *tile.indices(), tile.dout * scale, (fixed,))
    floating = torch.zeros(bias.shape, device=DEVICE)
    run_grad(kmod, tile.score, *tile.indices(), tile.dout, (floating,))
    torch.testing.assert_close(fixed.double() / scale, floating.double(), rtol=1e-6, atol=1e-6)


def test_empty_grad_args_skip_capture_gradients():
    tile = Tile()
    bias = torch.randn(tile.H, device=DEVICE, requires_grad=True)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score * 2 + bias[h]

    kmod = compile_score_mod(head_bias, device=DEVICE)
    assert kmod.grad_captures == (bias,)
    dscore = run_grad(kmod, tile.score, *tile.indices(), tile.dout, None)  # grad_caps = ()
    torch.testing.assert_close(dscore, tile.dout * 2)


def test_division_is_exact_where_it_decides_a_mask():
    """x * (1/7) differs from x / 7 in the last bit for about half of all x; a comparison after a
    division must see eager's quotient on the same device (IEEE on CPU, x * (1/7) on CUDA), or
    mask bits flip."""

    def round_trip(b, h, q_idx, kv_idx):
        by_constant = ((q_idx * 7.0) / 7.0 == q_idx) & ((kv_idx + 0.5) / 7.0 * 7.0 == kv_idx + 0.5)
        d = kv_idx + 0.37
        return by_constant | ((q_idx + 0.3) * d / d == q_idx + 0.3)  # tensor divisor: IEEE on both

    check_mask_mod(round_trip, Tile(Lq=100_000, Lkv=100_000))


def test_division_feeding_only_the_score_is_a_multiplication():
    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def bucketed(score, b, h, q_idx, kv_idx):
        return score + torch.floor(score / 30.0)

    assert "div_rn" not in explain(softcap, device=DEVICE).split("# Triton source")[1]
    # where the quotient is floored: exact on CPU (like eager CPU), x * (1/c) on GPUs (like eager CUDA)
    exact = "tl.div_rn(score" if DEVICE == "cpu" else "score * 0.03333333"
    assert exact in explain(bucketed, device=DEVICE)


def test_log_buckets_decide_mask_bits_like_eager():
    """Transcendentals feeding a floor use the accurate forms on GPUs (libdevice, not approximations)."""

    def same_log_bucket(b, h, q_idx, kv_idx):
        bucket = lambda i: torch.floor(torch.log2(i + 1.0) + torch.exp(i * 0.0) - 1.0)
        return (bucket(q_idx) == bucket(kv_idx)) | (
            torch.sqrt(q_idx * 1.0) == torch.floor(torch.sqrt(q_idx * 1.0))
        )

    check_mask_mod(same_log_bucket, Tile(Lq=5000, Lkv=5000))


def test_index_arithmetic_is_int64_only_for_huge_captures():
    small = torch.randn(4, 64, device=DEVICE)
    huge = torch.randn(4, 1, device=DEVICE).expand(4, 2**31)  # 2**33 elements, no memory

    def small_bias(score, b, h, q_idx, kv_idx):
        return score + small[h, q_idx]

    def huge_bias(score, b, h, q_idx, kv_idx):
        return score + huge[h, q_idx * 1_000_000 + kv_idx]

    assert "tl.int64" not in explain(small_bias, device=DEVICE)
    assert "tl.int64" in explain(huge_bias, device=DEVICE)
    tile = Tile(Lq=64, Lkv=64)
    got = run_score(compile_score_mod(huge_bias, device=DEVICE), tile.score, *tile.indices())
    torch.testing.assert_close(got, eager_score(huge_bias, tile.score, *tile.indices()))


def test_document_mask_from_offsets_by_binary_search():
    """torch.searchsorted / bucketize over captured sorted offsets (cu_seqlens style)."""
    tile = Tile(Lq=200, Lkv=200)
    cuts = torch.randperm(199)[: int(torch.randint(1, 12, ()))].sort().values + 1
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([200])]).to(DEVICE)
    edges = torch.sort(torch.rand(7, device=DEVICE) * 200).values

    def same_document(b, h, q_idx, kv_idx):
        doc = lambda i: torch.searchsorted(offsets, i, right=True)
        same = doc(q_idx) == doc(kv_idx)
        return same & (
            torch.bucketize(q_idx * 1.0, edges) >= torch.bucketize(kv_idx * 0.5, edges, right=True)
        )

    check_mask_mod(same_document, tile)
    head_doc = lambda score, b, h, q_idx, kv_idx: score + torch.searchsorted(offsets, h * 40, out_int32=True)
    check_score_mod(head_doc, tile)
