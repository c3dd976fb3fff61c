"""Torch functions that are not IR primitives, written as compositions of them.

Activations (``torch.nn.functional.gelu`` in both approximations, silu, softplus, mish, elu, selu,
celu, relu, leaky_relu, hardtanh, relu6, hardsigmoid, hardswish, logsigmoid,
softsign, tanhshrink, threshold, hardshrink, softshrink) and pointwise helpers (nan_to_num, lerp,
logaddexp/logaddexp2, xlogy/xlog1py, entr, sinc, logit, ndtr, frac, deg2rad/rad2deg, float_power,
ldexp, addcmul/addcdiv, heaviside, isclose, isposinf/isneginf, round(decimals=...)).

Each follows the formula of PyTorch's CPU kernel (aten/src/ATen/native/cpu), so values match eager,
and the gradient rules of the primitives (autodiff.py) give eager's gradient. As in PyTorch's
"opmath", float16/bfloat16 operands are computed in float32 and rounded once at the end; the result
dtype is the one torch gives (found by running the real function on dummy 0-dim tensors), and
torch's own refusals (``leaky_relu`` on integers, ...) become trace-time errors.

``HANDLERS`` maps the torch names (functions, Tensor methods, ``torch.nn.functional``) to handlers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexattn.compiler.errors import refuse
from flexattn.compiler.ir import LOW_PRECISION
from flexattn.compiler.proxy import Traced, binary, cast, clamp, constant, operand, unary, where

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_GELU_TANH_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # sqrt(2 / pi)
_GELU_TANH_KAPPA = 0.044715
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _result_dtype(torch_fn, args, kwargs) -> torch.dtype:
    dummies = [torch.ones((), dtype=a.dtype) if isinstance(a, Traced) else a for a in args]
    try:
        with torch._C.DisableTorchFunction():
            return torch_fn(*dummies, **kwargs).dtype
    except Exception as e:  # PyTorch's own refusal, e.g. "not implemented for 'Int'"
        raise refuse(f"torch rejects this operation: {e}", "check the operand dtypes") from None


def composite(torch_fn, tensors: int = 1):
    """A handler: the first ``tensors`` arguments are per-element operands, cast to the compute
    dtype (float32 for float16/bfloat16) before ``build`` runs; its result is cast to torch's."""

    def wrap(build):
        def handler(*args, **kwargs):
            kwargs.pop("inplace", None)  # inplace=True was refused before any handler runs
            args = tuple(operand(a) if i < tensors else a for i, a in enumerate(args))
            dtype = _result_dtype(torch_fn, args, kwargs)
            compute = torch.float32 if dtype in LOW_PRECISION else dtype
            operands = [cast(a, compute) if isinstance(a, Traced) else a for a in args[:tensors]]
            return cast(build(*operands, *args[tensors:], **kwargs), dtype)

        handler.__name__ = build.__name__
        return handler

    return wrap


def _mul(a, b):
    return binary("mul", a, b)


def _add(a, b):
    return binary("add", a, b)


def _sub(a, b):
    return binary("sub", a, b)


def _div(a, b):
    return binary("truediv", a, b)


def _isnan(x):
    return binary("ne", x, x)


# --- activations ---------------------------------------------------------------------------------


@composite(F.gelu)
def gelu(x, approximate="none"):
    if approximate == "tanh":
        inner = _mul(_GELU_TANH_BETA, _add(x, _mul(_GELU_TANH_KAPPA, _mul(_mul(x, x), x))))
        return _mul(_mul(0.5, x), _add(1, unary("tanh", inner)))
    return _mul(_mul(x, 0.5), _add(1, unary("erf", _mul(x, _SQRT1_2))))


@composite(F.silu)
def silu(x):
    return _div(x, _add(1, unary("exp", unary("neg", x))))


@composite(F.softplus)
def softplus(x, beta=1.0, threshold=20.0):
    bx = x if beta == 1 else _mul(x, beta)
    soft = unary("log1p", unary("exp", bx))
    return where(binary("gt", bx, threshold), x, soft if beta == 1 else _div(soft, beta))


@composite(F.mish)
def mish(x):
    return _mul(x, unary("tanh", unary("log1p", unary("exp", x))))


def _elu(x, alpha, scale, input_scale):
    negative = unary("expm1", x if input_scale == 1 else _mul(x, input_scale))
    return where(binary("le", x, 0), _mul(negative, alpha * scale), x if scale == 1 else _mul(x, scale))


@composite(F.elu)
def elu(x, alpha=1.0):
    return _elu(x, alpha, 1.0, 1.0)


@composite(F.selu)
def selu(x):
    return _elu(x, _SELU_ALPHA, _SELU_SCALE, 1.0)


@composite(F.celu)
def celu(x, alpha=1.0):
    return _elu(x, alpha, 1.0, 1.0 / alpha)


@composite(F.leaky_relu)
def leaky_relu(x, negative_slope=0.01):
    return where(binary("gt", x, 0), x, _mul(x, negative_slope))


@composite(torch.relu)
def relu(x):
    return clamp(x, 0, None)


@composite(F.hardtanh)
def hardtanh(x, min_val=-1.0, max_val=1.0):
    return clamp(x, min_val, max_val)


@composite(F.relu6)
def relu6(x):
    return clamp(x, 0, 6)


@composite(F.hardsigmoid)
def hardsigmoid(x):
    return _div(clamp(_add(x, 3), 0, 6), 6)


@composite(F.hardswish)
def hardswish(x):
    return _div(_mul(x, clamp(_add(x, 3), 0, 6)), 6)


@composite(F.logsigmoid)
def log_sigmoid(x):
    return _sub(clamp(x, None, 0), unary("log1p", unary("exp", unary("neg", unary("abs", x)))))


@composite(F.softsign)
def softsign(x):
    return _div(x, _add(unary("abs", x), 1))


@composite(F.tanhshrink)
def tanhshrink(x):
    return _sub(x, unary("tanh", x))


@composite(torch.threshold)
def threshold(x, threshold, value):
    return where(binary("le", x, threshold), value, x)


@composite(torch.hardshrink)
def hardshrink(x, lambd=0.5):
    inside = binary("logical_and", binary("ge", x, -lambd), binary("le", x, lambd))
    return where(inside, 0, x)


@composite(F.softshrink)
def softshrink(x, lambd=0.5):
    return where(
        binary("gt", x, lambd), _sub(x, lambd), where(binary("lt", x, -lambd), _add(x, lambd), _mul(x, 0))
    )


# --- pointwise helpers ---------------------------------------------------------------------------


@composite(torch.nan_to_num)
def nan_to_num(x, nan=0.0, posinf=None, neginf=None):
    if not x.dtype.is_floating_point:
        return x
    info = torch.finfo(x.dtype)
    posinf = info.max if posinf is None else posinf
    neginf = info.min if neginf is None else neginf
    x = where(binary("eq", x, -math.inf), neginf, x)
    return where(_isnan(x), nan, where(binary("eq", x, math.inf), posinf, x))


@composite(torch.lerp, tensors=3)
def lerp(start, end, weight):
    diff = _sub(end, start)
    small = binary("lt", unary("abs", weight), 0.5)
    return where(small, _add(start, _mul(weight, diff)), _sub(end, _mul(diff, _sub(1, weight))))


def _logaddexp(a, b, exp, log1p_scale):
    m = binary("maximum", a, b)
    tail = unary("log1p", unary(exp, unary("neg", unary("abs", _sub(a, b)))))
    both_inf = binary("logical_and", binary("eq", unary("abs", a), math.inf), binary("eq", a, b))
    return where(both_inf, a, _add(m, tail if log1p_scale == 1 else _mul(tail, log1p_scale)))


@composite(torch.logaddexp, tensors=2)
def logaddexp(a, b):
    return _logaddexp(a, b, "exp", 1)


@composite(torch.logaddexp2, tensors=2)
def logaddexp2(a, b):
    return _logaddexp(a, b, "exp2", 1 / math.log(2.0))


def _xlog(x, y, log):
    return where(_isnan(y), math.nan, where(binary("eq", x, 0), 0, _mul(x, unary(log, y))))


@composite(torch.xlogy, tensors=2)
def xlogy(x, y):
    return _xlog(x, y, "log")


@composite(torch.special.xlog1py, tensors=2)
def xlog1py(x, y):
    return _xlog(x, y, "log1p")


@composite(torch.special.entr)
def entr(x):
    positive = unary("neg", _mul(x, unary("log", x)))
    return where(_isnan(x), x, where(binary("gt", x, 0), positive, where(binary("eq", x, 0), 0, -math.inf)))


@composite(torch.sinc)
def sinc(x):
    product = _mul(x, math.pi)
    return where(binary("eq", x, 0), 1, _div(unary("sin", product), product))


@composite(torch.logit)
def logit(x, eps=None):
    if eps is not None:
        x = clamp(x, eps, 1 - eps)
    return unary("log", _div(x, _sub(1, x)))


@composite(torch.special.ndtr)
def ndtr(x):
    return _mul(0.5, unary("erfc", _mul(unary("neg", x), _SQRT1_2)))


@composite(torch.frac)
def frac(x):
    return _sub(x, unary("trunc", x))


@composite(torch.deg2rad)
def deg2rad(x):
    return _mul(x, math.pi / 180.0)


@composite(torch.rad2deg)
def rad2deg(x):
    return _mul(x, 180.0 / math.pi)


@composite(torch.float_power, tensors=2)
def float_power(base, exponent):
    return binary("pow", cast(base, torch.float64), cast(exponent, torch.float64))


@composite(torch.ldexp, tensors=2)
def ldexp(x, exponent):
    return _mul(x, binary("pow", 2.0, exponent))


@composite(torch.addcmul, tensors=3)
def addcmul(x, a, b, value=1):
    return _add(x, _mul(_mul(value, a), b))


@composite(torch.addcdiv, tensors=3)
def addcdiv(x, a, b, value=1):
    return _add(x, _mul(value, _div(a, b)))


@composite(torch.heaviside, tensors=2)
def heaviside(x, values):
    return where(binary("eq", x, 0), values, binary("gt", x, 0))


def isclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    a, b = operand(a), operand(b)
    close = binary("eq", a, b)
    if equal_nan:
        close = binary("logical_or", close, binary("logical_and", _isnan(a), _isnan(b)))
    if not _is_float(a) and not _is_float(b):
        return close
    error = unary("abs", _sub(a, b))
    allowed = _add(atol, unary("abs", _mul(rtol, b)))
    finite = binary("lt", error, math.inf)
    return binary("logical_or", close, binary("logical_and", finite, binary("le", error, allowed)))


def _is_float(x) -> bool:
    return x.dtype.is_floating_point if isinstance(x, Traced) else isinstance(x, float)


def isposinf(x):
    return binary("eq", x, math.inf)


def isneginf(x):
    return binary("eq", x, -math.inf)


def isreal(x):
    return constant(True)


def round_(x, *, decimals=0):
    """torch.round(x, decimals=d): ``rint(x * 10**d) / 10**d`` (``rint(x / 10**-d) * 10**-d`` for d < 0)."""
    if not decimals:
        return unary("round", x)

    @composite(torch.round)
    def rounded(x, decimals):
        ten_pow = 10.0 ** abs(decimals)
        if decimals < 0:
            return _mul(unary("round", _div(x, ten_pow)), ten_pow)
        return _div(unary("round", _mul(x, ten_pow)), ten_pow)

    return rounded(x, decimals=decimals)


HANDLERS = {
    "gelu": gelu,
    "silu": silu,
    "softplus": softplus,
    "mish": mish,
    "elu": elu,
    "selu": selu,
    "celu": celu,
    "leaky_relu": leaky_relu,
    "relu": relu,
    "hardtanh": hardtanh,
    "relu6": relu6,
    "hardsigmoid": hardsigmoid,
    "hardswish": hardswish,
    "log_sigmoid": log_sigmoid,
    "softsign": softsign,
    "tanhshrink": tanhshrink,
    "threshold": threshold,
    "_threshold": threshold,
    "hardshrink": hardshrink,
    "softshrink": softshrink,
    "nan_to_num": nan_to_num,
    "lerp": lerp,
    "logaddexp": logaddexp,
    "logaddexp2": logaddexp2,
    "xlogy": xlogy,
    "special_xlogy": xlogy,
    "special_xlog1py": xlog1py,
    "special_entr": entr,
    "sinc": sinc,
    "special_sinc": sinc,
    "logit": logit,
    "special_logit": logit,
    "special_ndtr": ndtr,
    "frac": frac,
    "deg2rad": deg2rad,
    "rad2deg": rad2deg,
    "float_power": float_power,
    "ldexp": ldexp,
    "addcmul": addcmul,
    "addcdiv": addcdiv,
    "heaviside": heaviside,
    "isclose": isclose,
    "isposinf": isposinf,
    "isneginf": isneginf,
    "isreal": isreal,
    "round": round_,
    "special_round": round_,
}


# Torch functions that are still refused: name -> (reason, hint). docs/debugging.md lists them.
def _each(names: str, reason: str, hint: str) -> dict[str, tuple[str, str]]:
    return dict.fromkeys(names.split(), (reason, hint))


_TABLE = "precompute a table outside the mod and gather from it (e.g. table[q_idx - kv_idx])"
REFUSED = {
    **_each(
        "lgamma digamma polygamma mvlgamma special_gammaln special_digamma special_psi special_polygamma "
        "special_multigammaln special_gammainc special_gammaincc special_zeta igamma igammac",
        "the gamma family has no Triton lowering yet",
        _TABLE,
    ),
    **_each(
        "erfinv special_erfinv special_ndtri special_log_ndtr special_erfcx i0 special_i0 special_i0e "
        "special_i1 special_i1e special_bessel_j0 special_bessel_j1 special_spherical_bessel_j0",
        "no accurate Triton lowering yet",
        _TABLE,
    ),
    **_each(
        "rand rand_like randn randn_like randint randint_like bernoulli normal poisson dropout "
        "alpha_dropout feature_alpha_dropout",
        "random numbers in a mod are not reproducible between the forward and the backward pass",
        "draw the noise outside the mod into a captured tensor and gather from it",
    ),
    **_each(
        "sum mean prod amax amin argmax argmin logsumexp softmax log_softmax cumsum cumprod std var norm "
        "special_softmax special_log_softmax special_logsumexp glu",
        "a mod sees one element, so a reduction has nothing to reduce",
        "precompute it outside the mod into a captured tensor",
    ),
    **_each(
        "rrelu",
        "torch.vmap (which evaluates mods on the reference backend and in create_block_mask) cannot run it",
        "use leaky_relu(x, (lower + upper) / 2), rrelu's value in eval mode",
    ),
    **_each("gcd lcm", "an integer loop per element has no lowering yet", _TABLE),
    **_each(
        "frexp nextafter",
        "no lowering of this bit-level float operation yet",
        "precompute it outside the mod",
    ),
}
