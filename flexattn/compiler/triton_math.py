"""Small ``@triton.jit`` helpers that generated mod code calls (``tm.<name>`` in the source).

Two families: PyTorch integer semantics that Triton lacks (Python-style ``//`` and ``%``, index
wrapping), and math functions written with core ``tl`` ops only, for Triton's interpreter, which
has no libdevice. On GPUs the code generator calls libdevice instead where it is more accurate.
"""

import triton
import triton.language as tl


@triton.jit
def arg_i64(encoded):
    """Decode a size or stride from the mod's argument tuple (see analysis.encode_int) as int64."""
    return (encoded - 1099511627777) >> 1


@triton.jit
def arg_i32(encoded):
    """Decode a size or stride from the mod's argument tuple (see analysis.encode_int) as int32."""
    return ((encoded - 1099511627777) >> 1).to(tl.int32)


@triton.jit
def wrap_index(i, size):
    """Python-style negative index, clamped into [0, size) so that no lane reads out of bounds."""
    i = tl.where(i < 0, i + size, i)
    return tl.minimum(tl.maximum(i, 0), size - 1)


@triton.jit
def clamp_index(i, size):
    """Clamp a non-negative index into [0, size)."""
    return tl.minimum(i, size - 1)


@triton.jit
def floordiv(a, b):
    """``a // b`` rounding toward minus infinity (torch.floor_divide on integers)."""
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)


@triton.jit
def remainder(a, b):
    """``a % b`` with the sign of ``b`` (torch.remainder), for integers and floats."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def sign(x):
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


@triton.jit
def round_half_even(x):
    """torch.round: nearest integer, ties to even."""
    r = tl.floor(x + 0.5)
    r = tl.where((r - x == 0.5) & (r % 2 != 0), r - 1, r)
    return tl.where(tl.abs(x) >= 8388608.0, x, r)


@triton.jit
def tanh(x):
    """tanh from exp: a short series near 0, exp(-2|x|) elsewhere (relative error ~1e-7)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 - x2 * (0.3333333333333333 - x2 * 0.13333333333333333))
    return tl.where(ax < 0.0625, small, tl.where(x < 0, -t, t))


@triton.jit
def fast_tanh(x):
    """One ``tanh.approx.f32`` instruction (NVIDIA GPUs only)."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def log1p(x):
    """log(1 + x), accurate for small x (Goldberg's correction)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def expm1(x):
    """exp(x) - 1, accurate for small x (Kahan's correction)."""
    u = tl.exp(x)
    d = u - 1.0
    lu = tl.log(u)
    r = d * (x / tl.where(lu == 0.0, 1.0, lu))
    return tl.where(d == 0.0, x, tl.where(d == -1.0, -1.0, tl.where(u == float("inf"), u, r)))


@triton.jit
def pow(x, y):
    """x ** y for floats (torch.pow): negative bases with integral exponents keep their sign."""
    r = tl.exp2(y * tl.log2(tl.abs(x)))
    integral = tl.floor(y) == y
    odd = integral & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where(x < 0, tl.where(integral, tl.where(odd, -r, r), float("nan")), r)
    return tl.where(y == 0, 1.0, r)


@triton.jit
def sum_to(val, ptr):
    """Sum a [X, Y] tile over the axes along which the 2-D ``ptr`` is constant (size 1)."""
    if ptr.shape[0] == 1:
        val = tl.sum(val, 0, keep_dims=True)
    if ptr.shape[1] == 1:
        val = tl.sum(val, 1, keep_dims=True)
    return val


@triton.jit
def ipow(base, exp):
    """Integer ``base ** exp`` by repeated squaring (torch: negative exponents give 0 unless |base| == 1)."""
    result = tl.full(base.shape, 1, base.dtype) * (base * 0 + 1)
    b = base
    e = tl.where(exp < 0, 0, exp)
    for _ in tl.static_range(63):
        result = tl.where((e & 1) != 0, result * b, result)
        b = b * b
        e = e >> 1
    negative = tl.where(base == 1, 1, tl.where(base == -1, tl.where((exp & 1) != 0, -1, 1), 0))
    return tl.where(exp < 0, negative.to(base.dtype), result)


@triton.jit
def _div(a, b):
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def floordiv_float(a, b):
    """torch.floor_divide on floats: floor of the exact quotient, computed from fmod like PyTorch."""
    mod = a % b
    div = _div(a - mod, b)
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    floored = tl.floor(div)
    floored = tl.where(div - floored > 0.5, floored + 1.0, floored)
    zero = tl.where(_div(a, b) < 0, -0.0, 0.0)
    return tl.where(b == 0, _div(a, b), tl.where(div != 0, floored, zero))


@triton.jit
def searchsorted(ptr, n, stride, v, RIGHT: tl.constexpr):
    """torch.searchsorted(seq, v, right=RIGHT) for a sorted 1-D ``seq`` of ``n`` elements: the first
    index whose element is >= v (> v when RIGHT), or n. A binary search per element of ``v``."""
    lo = tl.zeros_like(v).to(tl.int32)
    hi = lo + n
    width = n
    while width > 0:  # bit_length(n) >= ceil(log2(n + 1)) halvings
        width = width // 2
        mid = (lo + hi) // 2
        x = tl.load(ptr + tl.minimum(mid, n - 1) * stride).to(v.dtype)
        if RIGHT:
            go_right = (x <= v).to(tl.int32)  # (int32: the interpreter mistypes 0-dim float compares)
        else:
            go_right = (x < v).to(tl.int32)
        active = lo < hi
        lo = tl.where(active & (go_right != 0), mid + 1, lo)
        hi = tl.where(active & (go_right == 0), mid, hi)
    return lo


# --- the rest of the pointwise surface: bits and NaN rules for every target, special functions
# from core ops for the interpreter (GPUs call libdevice instead; see lowering.py) -------------


@triton.jit
def signbit(x):
    """torch.signbit: the sign bit of a float (True for -0.0 and negative NaNs)."""
    if x.dtype == tl.float64:
        return x.to(tl.int64, bitcast=True) < 0
    elif x.dtype == tl.float32:
        return x.to(tl.int32, bitcast=True) < 0
    else:
        return x.to(tl.int16, bitcast=True) < 0


@triton.jit
def copysign(a, b):
    """|a| with the sign bit of b (torch.copysign)."""
    return tl.where(signbit(b), -tl.abs(a), tl.abs(a))


@triton.jit
def fmax(a, b):
    """torch.fmax: the maximum, ignoring a NaN operand (NaN only if both are NaN)."""
    return tl.where(a != a, b, tl.where(b != b, a, tl.maximum(a, b)))


@triton.jit
def fmin(a, b):
    """torch.fmin: the minimum, ignoring a NaN operand (NaN only if both are NaN)."""
    return tl.where(a != a, b, tl.where(b != b, a, tl.minimum(a, b)))


@triton.jit
def tan(x):
    return tl.sin(x) / tl.cos(x)


@triton.jit
def atan(x):
    """Cephes' atanf: range reduction to |t| <= tan(pi/8), then an odd polynomial (~1e-7)."""
    ax = tl.abs(x)
    big = ax > 2.414213562373095
    mid = ax > 0.4142135623730950
    t = tl.where(big, -1.0 / tl.where(big, ax, 1.0), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    y0 = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    z = t * t
    p = (
        ((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1
    ) * z * t + t
    r = y0 + p
    return tl.where(x < 0, -r, r)


@triton.jit
def atan2(y, x):
    """torch.atan2: the angle of (x, y), quadrant from the signs (also of zeros)."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    r = atan(lo / tl.where(hi == 0, 1.0, hi))
    r = tl.where(ax == float("inf"), tl.where(ay == float("inf"), 0.7853981633974483, r), r)
    r = tl.where(ay > ax, 1.5707963267948966 - r, r)
    r = tl.where(signbit(x), 3.141592653589793 - r, r)
    return copysign(r, y)


@triton.jit
def asin(x):
    return atan2(x, tl.sqrt((1.0 - x) * (1.0 + x)))


@triton.jit
def acos(x):
    return atan2(tl.sqrt((1.0 - x) * (1.0 + x)), x)


@triton.jit
def sinh(x):
    """sinh from expm1 (no cancellation near 0); exp(|x| - log 2) where exp(|x|) would overflow."""
    ax = tl.abs(x)
    u = expm1(ax)
    r = tl.where(ax > 20.0, tl.exp(ax - 0.6931471805599453), 0.5 * (u + u / (u + 1.0)))
    return tl.where(x < 0, -r, r)


@triton.jit
def cosh(x):
    ax = tl.abs(x)
    e = tl.exp(ax)
    return tl.where(ax > 20.0, tl.exp(ax - 0.6931471805599453), 0.5 * (e + 1.0 / e))


@triton.jit
def asinh(x):
    """log1p form (accurate near 0); log(2|x|) for large |x|, where x * x would overflow."""
    ax = tl.abs(x)
    small = log1p(ax + ax * ax / (1.0 + tl.sqrt(1.0 + ax * ax)))
    r = tl.where(ax > 1.0e4, tl.log(ax) + 0.6931471805599453, small)
    return tl.where(x < 0, -r, r)


@triton.jit
def acosh(x):
    t = x - 1.0
    small = log1p(t + tl.sqrt(2.0 * t + t * t))
    return tl.where(x > 1.0e4, tl.log(x) + 0.6931471805599453, small)


@triton.jit
def atanh(x):
    ax = tl.abs(x)
    r = 0.5 * log1p(2.0 * ax / (1.0 - ax))
    return tl.where(x < 0, -r, r)


@triton.jit
def erfc(x):
    """1 - erf(x) without cancellation: Numerical Recipes' erfcc (relative error < 1.2e-7)."""
    z = tl.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -0.82215223 + t * 0.17087277
    poly = 0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * poly))
    poly = 1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * poly)))
    r = t * tl.exp(-z * z - 1.26551223 + t * poly)
    return tl.where(x >= 0, r, 2.0 - r)


@triton.jit
def hypot(a, b):
    """sqrt(a * a + b * b) without overflow or underflow in the squares."""
    aa = tl.abs(a)
    ab = tl.abs(b)
    hi = tl.maximum(aa, ab)
    lo = tl.minimum(aa, ab)
    ratio = lo / tl.where(hi == 0, 1.0, hi)
    h = hi * tl.sqrt(1.0 + ratio * ratio)
    return tl.where(aa == float("inf"), aa, tl.where(ab == float("inf"), ab, h))
