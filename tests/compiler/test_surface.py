# ruff: noqa: E501  (SURFACE: one line per torch function, laid out for reading)
"""The pointwise surface: every torch function a mod may call on 0-dim tensors, against eager PyTorch.

``SURFACE`` lists each supported function with a mod that calls it; each runs through the harness
kernels (Triton's interpreter on CPU) on a random tile: values, dLoss/dscore in both tile
orientations, three-way against float64 eager (test_codegen.check_score_mod). Integer and boolean
operations are exact. ``LEARNABLE`` runs the binary functions with a learnable captured operand,
whose gradient the kernels scatter into a buffer. ``test_every_handler_is_on_the_surface`` keeps the table complete: every name
the tracer accepts must be exercised here (or be a spelling listed in ``PLUMBING``), and
``test_refused_functions_say_why`` checks the functions still refused (docs/debugging.md).
``test_result_dtypes_follow_torch`` compares the traced dtypes with eager's for every input dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from flexattn.compiler import ModCompileError, compile_score_mod
from flexattn.compiler.composites import REFUSED
from flexattn.compiler.trace import _HANDLERS, trace
from tests.compiler.harness import run_score
from tests.compiler.test_codegen import DEVICE, Tile, check_score_mod

NAN, INF = math.nan, math.inf


def _pos(s):
    return s.abs() + 0.25


def _unit(s):
    return torch.tanh(s * 0.3) * 0.9


# id -> (torch names it exercises, body(s, t, d)): s the score (about +-9), t a second float made
# from it, d = q_idx - kv_idx (int32, either sign). Bodies return one value per element.
SURFACE = {
    # arithmetic and operators
    "add-sub-alpha": ("add sub subtract rsub __rsub__ __add__ __sub__", lambda s, t, d: torch.add(s, t, alpha=2) - torch.sub(t, s, alpha=0.5) + torch.rsub(s, 1.0) + torch.subtract(s, t) + (1 - s)),
    "mul-div": ("mul multiply div divide true_divide __div__ __mul__ __truediv__", lambda s, t, d: torch.mul(s, t) + torch.multiply(s, 2) + torch.div(s, t + 3) + torch.divide(t, 3) + torch.true_divide(s, 7)),
    "neg-abs-square": ("neg negative abs absolute square positive __neg__ __abs__", lambda s, t, d: -torch.neg(s) + abs(t) + torch.negative(t) + torch.abs(s) * torch.absolute(t) + torch.square(s) + torch.positive(s)),
    "reciprocal-rsqrt-sqrt": ("reciprocal rsqrt sqrt", lambda s, t, d: torch.reciprocal(_pos(s)) + torch.rsqrt(_pos(t)) + torch.sqrt(_pos(s))),
    "pow-tensor-exponent": ("pow __pow__", lambda s, t, d: torch.pow(_pos(s), t * 0.3) + _pos(t) ** (s * 0.1)),
    "pow-scalar-exponent": ("pow", lambda s, t, d: s**2 + s**3 + _pos(s) ** 1.7 + _pos(t) ** -0.5 + _pos(s) ** -1 + _pos(s) ** 0.5),
    "pow-scalar-base": ("pow", lambda s, t, d: 2 ** (s * 0.3) + torch.pow(1.5, t)),
    "float-power": ("float_power", lambda s, t, d: torch.float_power(_pos(s), t * 0.5).float()),
    "ldexp": ("ldexp", lambda s, t, d: torch.ldexp(s, d % 5)),
    "addcmul-addcdiv": ("addcmul addcdiv", lambda s, t, d: torch.addcmul(s, t, s, value=0.5) + torch.addcdiv(t, s, t + 3, value=2)),
    "lerp-scalar-weight": ("lerp", lambda s, t, d: torch.lerp(s, t, 0.3) + torch.lerp(t, s, 0.8)),
    "lerp-tensor-weight": ("lerp", lambda s, t, d: torch.lerp(s, t, torch.sigmoid(t))),
    # division, remainders, rounding
    "remainder-python-semantics": ("remainder __mod__", lambda s, t, d: torch.remainder(s, 1.3 + t.abs()) + s % -0.7),
    "fmod-c-semantics": ("fmod", lambda s, t, d: torch.fmod(s, 1.3 + t.abs()) + torch.fmod(s, -0.7)),
    "floor-divide": ("floor_divide __floordiv__", lambda s, t, d: torch.floor_divide(s.detach(), 0.6) + s.detach() // (t.detach().abs() + 0.5) + s),  # (no eager derivative)
    "div-rounding-modes": ("div", lambda s, t, d: torch.div(s, 0.7, rounding_mode="floor") + torch.div(s, t + 3, rounding_mode="trunc") + s),
    "floor-ceil-trunc-fix": ("floor ceil trunc fix", lambda s, t, d: torch.floor(s) + torch.ceil(t) + torch.trunc(s) + torch.fix(t) + s),
    "round": ("round special_round", lambda s, t, d: torch.round(s) + torch.round((d * 0.5).float()) + torch.special.round(t) + s),
    "round-decimals": ("round", lambda s, t, d: torch.round(s, decimals=2) + torch.round(t * 100, decimals=-1) + s),
    "frac": ("frac", lambda s, t, d: torch.frac(s) + torch.frac(-t)),
    "sign-sgn": ("sign sgn", lambda s, t, d: torch.sign(s) + torch.sgn(t) + s),
    # exponentials and logarithms
    "exp-exp2-expm1": ("exp exp2 special_exp2 expm1 special_expm1", lambda s, t, d: torch.exp(s * 0.3) + torch.exp2(t) + torch.special.exp2(s * 0.2) + torch.expm1(s * 0.1) + torch.special.expm1(t * 1e-3) * 1e3),
    "log-family": ("log log2 log10 log1p special_log1p", lambda s, t, d: torch.log(_pos(s)) + torch.log2(_pos(t)) + torch.log10(_pos(s)) + torch.log1p(_pos(t)) + torch.special.log1p(_pos(s) * 1e-3) * 1e3),
    "logaddexp": ("logaddexp logaddexp2", lambda s, t, d: torch.logaddexp(s, t) + torch.logaddexp2(t, s * 2)),
    "xlogy-xlog1py-entr": ("xlogy special_xlogy special_xlog1py special_entr", lambda s, t, d: torch.xlogy(s, _pos(t)) + torch.special.xlogy(t, _pos(s)) + torch.special.xlog1py(s, _pos(t)) + torch.special.entr(_pos(s))),
    "logit": ("logit special_logit", lambda s, t, d: torch.logit(torch.sigmoid(s * 0.5)) + torch.special.logit(torch.sigmoid(t), eps=0.2)),
    # trigonometric and hyperbolic functions and their inverses
    "sin-cos-tan": ("sin cos tan", lambda s, t, d: torch.sin(s) + torch.cos(t) + torch.tan(s * 0.15)),
    "asin-acos-atan": ("asin arcsin acos arccos atan arctan", lambda s, t, d: torch.asin(_unit(s)) + torch.arcsin(_unit(t)) + torch.acos(_unit(s)) + torch.arccos(_unit(t)) + torch.atan(s) + torch.arctan(t * 5)),
    "atan2": ("atan2 arctan2", lambda s, t, d: torch.atan2(s, t) + torch.arctan2(t, s - 1)),
    "sinh-cosh-tanh": ("sinh cosh tanh", lambda s, t, d: torch.sinh(s * 0.3) + torch.cosh(t) + torch.tanh(s) + torch.sinh(t * 1e-3) * 1e3),
    "asinh-acosh-atanh": ("asinh arcsinh acosh arccosh atanh arctanh", lambda s, t, d: torch.asinh(s) + torch.arcsinh(t * 1e-3) * 1e3 + torch.acosh(_pos(s) + 1) + torch.arccosh(_pos(t) + 1) + torch.atanh(_unit(s)) + torch.arctanh(_unit(t))),
    "hypot": ("hypot", lambda s, t, d: torch.hypot(s, t)),
    "deg2rad-rad2deg": ("deg2rad rad2deg", lambda s, t, d: torch.deg2rad(s) + torch.rad2deg(t)),
    "sinc": ("sinc special_sinc", lambda s, t, d: torch.sinc(s * 0.3) + torch.special.sinc(t)),
    # error functions and probabilities
    "erf-erfc-ndtr": ("erf special_erf erfc special_erfc special_ndtr", lambda s, t, d: torch.erf(s * 0.5) + torch.special.erf(t) + torch.erfc(s * 0.5) + torch.special.erfc(t) + torch.special.ndtr(s * 0.3)),
    "sigmoid": ("sigmoid special_expit", lambda s, t, d: torch.sigmoid(s) + torch.special.expit(t) + F.sigmoid(s * 2)),
    # activations
    "gelu-exact": ("gelu", lambda s, t, d: F.gelu(s)),
    "gelu-tanh": ("gelu", lambda s, t, d: F.gelu(s, approximate="tanh")),
    "silu-mish": ("silu mish", lambda s, t, d: F.silu(s) + F.mish(t)),
    "softplus": ("softplus", lambda s, t, d: F.softplus(s) + F.softplus(t * 10, beta=2.0, threshold=15.0)),
    "elu-selu-celu": ("elu selu celu", lambda s, t, d: F.elu(s) + F.elu(t, alpha=0.5) + F.selu(s) + F.celu(t, alpha=2.0)),
    "relu-family": ("relu relu6 leaky_relu hardtanh", lambda s, t, d: F.relu(s) + torch.relu(t) + F.relu6(s) + F.leaky_relu(t, 0.2) + F.hardtanh(t, -0.5, 1.5)),
    "hard-activations": ("hardsigmoid hardswish hardshrink softshrink", lambda s, t, d: F.hardsigmoid(s) + F.hardswish(t * 2) + F.hardshrink(s, 1.0) + F.softshrink(t, 0.7)),
    "log-sigmoid-softsign-tanhshrink": ("log_sigmoid softsign tanhshrink", lambda s, t, d: F.logsigmoid(s) + F.softsign(t) + F.tanhshrink(s)),
    "threshold": ("_threshold threshold", lambda s, t, d: F.threshold(s, 0.5, -2.0) + torch.threshold(t, -0.5, 3.0)),
    # selection, clamping, extrema
    "where-masked-fill": ("where masked_fill", lambda s, t, d: torch.where(d > 0, s, t) + s.masked_fill(d % 3 == 0, -1.0) + torch.where(s > t, 1.0, s)),
    "clamp-clip": ("clamp clip clamp_min clamp_max", lambda s, t, d: torch.clamp(s, -1.0, 2.0) + torch.clamp(s, min=t) + torch.clip(t, max=s) + torch.clamp_min(s, -0.5) + torch.clamp_max(t, 0.5)),
    "maximum-minimum": ("maximum minimum max min", lambda s, t, d: torch.maximum(s, t) + torch.minimum(s, t * 0.5) + torch.max(s, -t) + torch.min(t, s * 2)),
    "fmax-fmin-nan": ("fmax fmin", lambda s, t, d: torch.fmax(torch.where(d % 3 == 0, NAN, s), t) + torch.fmin(s, torch.where(d % 2 == 0, NAN, t))),
    "copysign-signbit": ("copysign signbit", lambda s, t, d: torch.copysign(s, t) + torch.copysign(t, -1.0) + torch.where(torch.signbit(s * t), s, -t)),
    "heaviside": ("heaviside", lambda s, t, d: torch.heaviside(torch.round(s), t).detach() + s),  # (no eager derivative)
    "nan-to-num": ("nan_to_num", lambda s, t, d: torch.nan_to_num(torch.where(d % 3 == 0, NAN, torch.where(d % 3 == 1, INF * torch.sign(t), s)), nan=0.5, posinf=9.0) + torch.nan_to_num(torch.where(d > 0, -INF, s))),
    # tests on values
    "isnan-isinf-isfinite": ("isnan isinf isfinite isposinf isneginf isreal", lambda s, t, d: torch.where(torch.isnan(torch.where(d % 2 == 0, NAN, s)) | torch.isinf(torch.where(d % 3 == 0, -INF, s)), s, t) + torch.isfinite(torch.where(d > 0, INF, s)) + torch.isposinf(torch.where(d > 0, INF, -INF)) * 2 + torch.isneginf(torch.where(d > 1, -INF, s)) * 3 + torch.isreal(s)),
    "isclose": ("isclose", lambda s, t, d: torch.where(torch.isclose(s, torch.round(s), atol=0.2) | torch.isclose(t, t + 1e-7), s, -s)),
    "comparisons": ("lt less __lt__ le less_equal __le__ gt greater __gt__ ge greater_equal __ge__ eq __eq__ ne not_equal __ne__", lambda s, t, d: torch.where(torch.lt(s, t) ^ torch.less(s, 1) ^ (s < 2) ^ torch.le(t, 0) ^ torch.less_equal(s, t) ^ (t <= s) ^ torch.gt(s, -1) ^ torch.greater(t, s) ^ (s > t * 2) ^ torch.ge(s, 0.5) ^ torch.greater_equal(t, 1) ^ (s >= t) ^ torch.eq(torch.round(s), 1) ^ (torch.floor(t) == 0) ^ torch.ne(torch.round(s), 0) ^ torch.not_equal(d, 0) ^ (d != 1), s, t)),
    "logical-ops": ("logical_and logical_or logical_xor logical_not", lambda s, t, d: torch.where(torch.logical_and(s > 0, t > 0) | torch.logical_or(s > 2, d > 0) ^ torch.logical_xor(t > 1, d % 2 == 0) & torch.logical_not(s < -1), s, t) + torch.logical_and(s, d)),
    # integers and bits: exact
    "bit-ops": ("bitwise_and __and__ bitwise_or __or__ bitwise_xor __xor__ bitwise_not __invert__", lambda s, t, d: s + (torch.bitwise_and(d, 6) + (d | 3) + torch.bitwise_or(d, -8) + (d ^ 5) + torch.bitwise_xor(d, d * 3) + torch.bitwise_not(d) + ~d + (d & d * 7)) * 0.01),
    "shifts": ("bitwise_left_shift __lshift__ bitwise_right_shift __rshift__", lambda s, t, d: s + ((d << 2) + (d >> 1) + torch.bitwise_left_shift(d, d.abs() % 40) % 1000 + torch.bitwise_right_shift(d * 1000, d % 40) + (d >> 40) + (d << 33)) * 0.01),
    "integer-division": ("floor_divide remainder fmod div", lambda s, t, d: s + (torch.floor_divide(d, 3) + torch.remainder(d, -4) + torch.fmod(d, 3) + torch.fmod(-d, -5) + d // -2 + d % 7 + torch.div(d, 4, rounding_mode="trunc") + torch.div(d, 4)) * 0.1),
    "integer-functions": ("abs sign maximum minimum fmax fmin clamp pow where", lambda s, t, d: s + (torch.abs(d) + torch.sign(d) * 5 + torch.maximum(d, 2 - d) + torch.minimum(d, -d) + torch.fmax(d, d * 2) + torch.fmin(d, 3 - d) + torch.clamp(d, -3, 4) + torch.pow(d % 4, 3) + torch.where(d > 0, d, 7)) * 0.1),
    "integer-math-promotes": ("sqrt exp sin atan2 copysign", lambda s, t, d: s + torch.sqrt(d.abs()) + torch.exp(d * 0.1) * 0 + torch.sin(d) + torch.atan2(d, d + 3) + torch.copysign(d, d - 1)),
    # casts
    "casts": ("float double half bfloat16 int long short char byte bool to type type_as", lambda s, t, d: s.double().float() + s.detach().half().float() + torch.round(t * 4).bfloat16().float() + s.int() + s.long() + t.short() + (d % 100).char() + (d.abs() % 200).byte() + s.bool() + s.to(torch.float64).to(torch.float32) + s.detach().type(torch.float16).float() + d.type_as(s)),
}  # fmt: skip

# Names the tracer accepts that are plumbing, not math: constants, indexing, no-ops, detach.
PLUMBING = frozenset(
    [
        "__getitem__",
        "clone",
        "contiguous",
        "squeeze",
        "detach",
        "zeros_like",
        "ones_like",
        "full_like",
        "new_tensor",
        "new_zeros",
        "new_ones",
        "new_full",
        "searchsorted",
        "bucketize",
    ]
)


def _mod(body):
    def mod(score, b, h, q_idx, kv_idx):
        t = torch.cos(score) * 2.0 + 0.25  # a second float operand, not a multiple of the score
        return body(score, t, q_idx - kv_idx)

    return mod


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU",
)
@pytest.mark.parametrize("name", list(SURFACE))
def test_surface_matches_eager(name):
    tile = Tile(Lq=40, Lkv=40)
    check_score_mod(_mod(SURFACE[name][1]), tile)


# Half-precision operands: torch computes these in fp32 ("opmath") and rounds the result to half once.
HALF_OPS = {
    "gelu": lambda x, y: F.gelu(x),
    "atan2": lambda x, y: torch.atan2(y, x),
    "lerp": lambda x, y: torch.lerp(x, y, 0.25),
    "hypot": lambda x, y: torch.hypot(y, x),
}


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU",
)
@pytest.mark.parametrize("name", list(HALF_OPS))
def test_half_precision_ops_round_once(name):
    """Each result is one rounding to half of a value within fp32 error of the exact one, as in eager.

    Half math step by step lands outside that bracket. The operands are the score and
    ``score * 0.25 + 0.5``, exact in fp32 on every backend, so both sides round identical values
    to half. (A transcendental second operand differs by an fp32 ulp between libraries; after
    rounding to half that is a whole half ulp, now and then, which no error bound on the sum judges.)
    """
    op = HALF_OPS[name]

    def mod(score, b, h, q_idx, kv_idx):
        return op(score.detach().half(), (score.detach() * 0.25 + 0.5).half()).float()

    tile = Tile(Lq=40, Lkv=40)
    got = run_score(compile_score_mod(mod, device=DEVICE), tile.score, *tile.indices())
    x16, y16 = tile.score.half(), (tile.score * 0.25 + 0.5).half()
    exact = op(x16.double(), y16.double())  # float64 math on the half operands
    # the fp32 result before rounding errs like eager's fp32 (gelu's erf cancels for negative x)
    eager_err = (op(x16.float(), y16.float()).double() - exact).abs().max()
    slack = 3 * eager_err + 4 * 2.0**-24 * exact.abs()
    lo, hi = (exact - slack).half().float(), (exact + slack).half().float()
    assert torch.equal(got, got.half().float()), f"{name}: the result is not rounded to half"
    outside = (got < lo) | (got > hi)
    assert not bool(outside.any()), (
        f"{name}: {int(outside.sum())} of {got.numel()} results are not a rounding of the exact value, "
        f"e.g. got {got[outside][0].item():.6g} for exact {exact[outside][0].item():.6g}"
    )


def test_every_handler_is_on_the_surface():
    covered = {n for names, _ in SURFACE.values() for n in names.split()} | PLUMBING
    missing = sorted(set(_HANDLERS) - covered)
    assert not missing, f"accepted by the tracer but not exercised by SURFACE: {missing}"
    unknown = sorted(covered - set(_HANDLERS))
    assert not unknown, f"SURFACE names the tracer does not handle: {unknown}"


@pytest.mark.parametrize(
    "call",
    [
        lambda s: torch.lgamma(s),
        lambda s: torch.special.erfinv(s),
        lambda s: torch.rand_like(s),
        lambda s: F.dropout(s, 0.1),
        lambda s: torch.logsumexp(s, 0),
        lambda s: F.rrelu(s, training=True),
        lambda s: F.relu(s, inplace=True),
    ],
    ids=["lgamma", "erfinv", "rand_like", "dropout", "logsumexp", "rrelu-training", "relu-inplace"],
)
def test_refused_functions_say_why(call):
    def mod(score, b, h, q_idx, kv_idx):
        return call(score)

    with pytest.raises(ModCompileError) as error:
        compile_score_mod(mod, device=DEVICE)
    message = str(error.value)
    assert "test_surface.py" in message and "hint:" in message, message
    assert (
        any(reason in message for reason, _ in REFUSED.values())
        or "in-place" in message
        or "random" in message
    )


UNARY = [
    torch.exp, torch.log1p, torch.sin, torch.atan, torch.asinh, torch.erfc, torch.sqrt, torch.abs, torch.neg,
    torch.sign, torch.signbit, torch.floor, torch.round, torch.reciprocal, torch.sigmoid, torch.tanh,
    torch.isnan, torch.isinf, torch.nan_to_num, torch.frac, torch.deg2rad, torch.sinc, torch.logit,
    torch.special.ndtr, torch.special.entr, torch.square, torch.bitwise_not, torch.logical_not, F.gelu,
    F.silu, F.softplus, F.mish, F.elu, F.leaky_relu, F.hardtanh, F.relu, F.relu6, F.hardswish, F.logsigmoid,
    F.softsign, torch.log10, torch.exp2, torch.erf, torch.trunc,
]  # fmt: skip
BINARY = [
    torch.atan2, torch.hypot, torch.copysign, torch.fmod, torch.remainder, torch.fmax, torch.maximum,
    torch.pow, torch.float_power, torch.logaddexp, torch.xlogy, torch.floor_divide, torch.true_divide,
    torch.ldexp, torch.heaviside, torch.bitwise_left_shift, torch.bitwise_and, torch.lt, torch.logical_xor,
]  # fmt: skip
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


def _traced_dtype(fn, dtypes):
    seen = []

    def mod(score, b, h, q_idx, kv_idx):
        seen.append(fn(*[(q_idx + i).to(dt) for i, dt in enumerate(dtypes)]).dtype)
        return score

    trace(mod, "score")
    return seen[0]


def _eager_dtype(fn, dtypes):
    return fn(*[torch.ones((), dtype=dt) for dt in dtypes]).dtype


@pytest.mark.parametrize("fn", UNARY + BINARY, ids=lambda f: f.__name__)
def test_result_dtypes_follow_torch(fn):
    arity = 2 if fn in BINARY else 1
    pairs = [(dt,) for dt in DTYPES] if arity == 1 else [(a, b) for a in DTYPES for b in DTYPES[::3]]
    for dtypes in pairs:
        try:
            want = _eager_dtype(fn, dtypes)
        except (RuntimeError, TypeError):
            with pytest.raises(ModCompileError):
                _traced_dtype(fn, dtypes)
            continue
        assert _traced_dtype(fn, dtypes) == want, f"{fn.__name__}{dtypes}"


# Binary functions with a learnable captured tensor as one operand: their gradients scatter into it.
LEARNABLE = {
    "atan2": lambda s, w: torch.atan2(s, w) + torch.atan2(w, s),
    "hypot": lambda s, w: torch.hypot(s, w),
    "copysign": lambda s, w: torch.copysign(w, s) + torch.copysign(s, w),
    "fmod-remainder": lambda s, w: torch.fmod(s, w.abs() + 0.5) + torch.remainder(w, s.abs() + 0.5),
    "fmax-fmin": lambda s, w: torch.fmax(s, w) + torch.fmin(w, s * 0.5),
    "lerp": lambda s, w: (
        torch.lerp(s, w.to(s.dtype), 0.3) + torch.lerp(w.to(s.dtype), s, torch.sigmoid(w).to(s.dtype))
    ),
    "logaddexp-xlogy": lambda s, w: torch.logaddexp(s, w) + torch.xlogy(w, s.abs() + 0.25),
    "pow": lambda s, w: (w.abs() + 0.5) ** (s * 0.1) + (s.abs() + 0.5) ** w,
    "activations": lambda s, w: F.gelu(w) * s + F.softplus(w) + F.elu(w * s) + torch.asinh(w),
}


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU",
)
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_gradients_reach_learnable_captures(name):
    tile = Tile(Lq=40, Lkv=40)
    weight = torch.randn(tile.H, 40, device=DEVICE) * 2

    def mod(score, b, h, q_idx, kv_idx):
        return LEARNABLE[name](score, weight[h, kv_idx])

    check_score_mod(mod, tile, [weight])
