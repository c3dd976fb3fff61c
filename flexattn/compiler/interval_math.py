"""``@triton.jit`` transfer functions of the interval domain (``im.<name>`` in generated code).

Every integer or boolean value of a mask mod is bounded by an int64 pair ``(lo, hi)``: each element
of the tile lies in ``[lo, hi]``. Booleans are ``0 <= lo <= hi <= 1``: ``lo == 1`` means all True,
``hi == 0`` all False. Float32 values are bounded by float32 pairs, NaN meaning unknown (every
comparison below is written so that NaN bounds decide nothing); known float bounds are finite, so
the values they bound are finite too. Each function returns bounds that contain every value the operation can take
for operands in the given bounds (soundness); where that cannot be guaranteed (possible int64
overflow, a divisor interval holding 0) it returns the widest bounds, ``[INT64_MIN, INT64_MAX]``, or
``[0, 1]`` for booleans. Results of narrower integer dtypes are passed through ``fit``, which widens
them to the dtype's whole range when the exact result might have wrapped around.

The helpers work on scalars and on vectors alike (they only broadcast).
"""

import triton
import triton.language as tl

from flexattn.compiler import triton_math as tm

I64_MIN = tl.constexpr(-9223372036854775808)
I64_MAX = tl.constexpr(9223372036854775807)
SAFE_ADD = tl.constexpr(4611686018427387904)  # 2**62: sums of two such values fit in int64
SAFE_MUL = tl.constexpr(2147483648)  # 2**31: products of two such values fit in int64


@triton.jit
def _within(x, bound):
    return (x > -bound) & (x < bound)


@triton.jit
def fit(lo, hi, MIN: tl.constexpr, MAX: tl.constexpr):
    """Bounds of a value of a dtype with range [MIN, MAX]: widened to it where they leave it."""
    ok = (lo >= MIN) & (hi <= MAX)
    return tl.where(ok, lo, MIN), tl.where(ok, hi, MAX)


@triton.jit
def add(al, ah, bl, bh):
    ok = _within(al, SAFE_ADD) & _within(ah, SAFE_ADD) & _within(bl, SAFE_ADD) & _within(bh, SAFE_ADD)
    return tl.where(ok, al + bl, I64_MIN), tl.where(ok, ah + bh, I64_MAX)


@triton.jit
def sub(al, ah, bl, bh):
    ok = _within(al, SAFE_ADD) & _within(ah, SAFE_ADD) & _within(bl, SAFE_ADD) & _within(bh, SAFE_ADD)
    return tl.where(ok, al - bh, I64_MIN), tl.where(ok, ah - bl, I64_MAX)


@triton.jit
def mul(al, ah, bl, bh):
    ok = _within(al, SAFE_MUL) & _within(ah, SAFE_MUL) & _within(bl, SAFE_MUL) & _within(bh, SAFE_MUL)
    p1, p2, p3, p4 = al * bl, al * bh, ah * bl, ah * bh
    lo = tl.minimum(tl.minimum(p1, p2), tl.minimum(p3, p4))
    hi = tl.maximum(tl.maximum(p1, p2), tl.maximum(p3, p4))
    return tl.where(ok, lo, I64_MIN), tl.where(ok, hi, I64_MAX)


@triton.jit
def neg(al, ah):
    ok = _within(al, SAFE_ADD) & _within(ah, SAFE_ADD)
    return tl.where(ok, -ah, I64_MIN), tl.where(ok, -al, I64_MAX)


@triton.jit
def absolute(al, ah):
    ok = _within(al, SAFE_ADD) & _within(ah, SAFE_ADD)
    lo = tl.where(al >= 0, al, tl.where(ah <= 0, -ah, 0))
    hi = tl.maximum(tl.where(al < 0, -al, al), tl.where(ah < 0, -ah, ah))
    return tl.where(ok, lo, I64_MIN), tl.where(ok, hi, I64_MAX)


@triton.jit
def sign(al, ah):
    return tm.sign(al), tm.sign(ah)


@triton.jit
def floordiv(al, ah, bl, bh):
    """Python ``a // b``: monotone in each argument where ``b`` keeps one sign, so the corners bound it."""
    ok = ((bl > 0) | (bh < 0)) & _within(al, SAFE_ADD) & _within(ah, SAFE_ADD)
    ok = ok & _within(bl, SAFE_ADD) & _within(bh, SAFE_ADD)
    dl = tl.where(ok, bl, 1)
    dh = tl.where(ok, bh, 1)
    p1, p2 = tm.floordiv(al, dl), tm.floordiv(al, dh)
    p3, p4 = tm.floordiv(ah, dl), tm.floordiv(ah, dh)
    lo = tl.minimum(tl.minimum(p1, p2), tl.minimum(p3, p4))
    hi = tl.maximum(tl.maximum(p1, p2), tl.maximum(p3, p4))
    return tl.where(ok, lo, I64_MIN), tl.where(ok, hi, I64_MAX)


@triton.jit
def remainder(al, ah, bl, bh):
    """Python ``a % b`` (sign of ``b``). Exact when ``b`` is one positive value and ``a`` stays within one
    period; ``[0, b_hi - 1]`` for positive ``b`` (``[b_lo + 1, 0]`` for negative), else unknown."""
    ok_a = _within(al, SAFE_ADD) & _within(ah, SAFE_ADD)
    pos = (bl > 0) & ok_a & _within(bh, SAFE_ADD)
    negative = (bh < 0) & ok_a & _within(bl, SAFE_ADD)
    d = tl.where(pos & (bl == bh), bl, 1)
    one_period = pos & (bl == bh) & (tm.floordiv(al, d) == tm.floordiv(ah, d))
    inside_pos = pos & (al >= 0) & (ah < bl)  # a % b == a for every b in [bl, bh]
    inside_neg = negative & (ah <= 0) & (al > bh)
    lo = tl.where(pos, 0, tl.where(negative, bl + 1, I64_MIN))
    hi = tl.where(pos, bh - 1, tl.where(negative, 0, I64_MAX))
    lo = tl.where(one_period, tm.remainder(al, d), tl.where(inside_pos | inside_neg, al, lo))
    hi = tl.where(one_period, tm.remainder(ah, d), tl.where(inside_pos | inside_neg, ah, hi))
    return lo, hi


@triton.jit
def _smear(x):
    """The smallest 2**k - 1 >= x, for 0 <= x < 2**63."""
    x = x | (x >> 1)
    x = x | (x >> 2)
    x = x | (x >> 4)
    x = x | (x >> 8)
    x = x | (x >> 16)
    x = x | (x >> 32)
    return x


@triton.jit
def bit_and(al, ah, bl, bh):
    point = (al == ah) & (bl == bh)
    lo = tl.where(point, al & bl, tl.where((al >= 0) | (bl >= 0), 0, I64_MIN))
    bound = tl.where((al >= 0) & (bl >= 0), tl.minimum(ah, bh), tl.where(al >= 0, ah, bh))
    hi = tl.where(point, al & bl, tl.where((al >= 0) | (bl >= 0), bound, I64_MAX))
    return lo, hi


@triton.jit
def bit_or(al, ah, bl, bh, XOR: tl.constexpr):
    point = (al == ah) & (bl == bh)
    nonneg = (al >= 0) & (bl >= 0)
    if XOR:
        exact = al ^ bl
        lo = tl.where(point, exact, tl.where(nonneg, 0, I64_MIN))
    else:
        exact = al | bl
        lo = tl.where(point, exact, tl.where(nonneg, tl.maximum(al, bl), I64_MIN))
    hi = tl.where(point, exact, tl.where(nonneg, _smear(tl.maximum(ah, bh)), I64_MAX))
    return lo, hi


@triton.jit
def invert(al, ah):
    """Bitwise ``~x == -x - 1``: decreasing, never overflows."""
    return ~ah, ~al


@triton.jit
def shift(al, ah, bl, bh, LEFT: tl.constexpr):
    """``a << b`` / ``a >> b`` for one shift amount ``0 <= b < 32``; left shifts need |a| < 2**31."""
    ok = (bl == bh) & (bl >= 0) & (bl < 32)
    k = tl.where(ok, bl, 0)
    if LEFT:
        ok = ok & _within(al, SAFE_MUL) & _within(ah, SAFE_MUL)
        lo, hi = al << k, ah << k
    else:
        lo, hi = al >> k, ah >> k
    return tl.where(ok, lo, I64_MIN), tl.where(ok, hi, I64_MAX)


# ---- booleans --------------------------------------------------------------------------------------


@triton.jit
def truth(al, ah):
    """``x != 0`` of an integer interval, as boolean bounds."""
    lo = ((al > 0) | (ah < 0)).to(tl.int64)
    hi = ((al != 0) | (ah != 0)).to(tl.int64)
    return lo, hi


@triton.jit
def _i(flag):
    """A comparison as int64 0/1 (the interpreter types 0-dim float comparisons as floats, so they
    are combined with ``&``/``|`` only after this)."""
    return flag.to(tl.int64)


@triton.jit
def lt(al, ah, bl, bh):
    """Written so that NaN bounds (an unknown float) decide nothing: each decision is an ordered compare."""
    return (ah < bl).to(tl.int64), 1 - (al >= bh).to(tl.int64)


@triton.jit
def le(al, ah, bl, bh):
    return (ah <= bl).to(tl.int64), 1 - (al > bh).to(tl.int64)


@triton.jit
def eq(al, ah, bl, bh):
    """Equal for sure only when both are the same single value; surely unequal when disjoint."""
    lo = _i(al == ah) & _i(bl == bh) & _i(al == bl)
    hi = 1 - (_i(ah < bl) | _i(bh < al))
    return lo, hi


@triton.jit
def ne(al, ah, bl, bh):
    lo, hi = eq(al, ah, bl, bh)
    return 1 - hi, 1 - lo


@triton.jit
def logical_xor(al, ah, bl, bh):
    point = (al == ah) & (bl == bh)
    return tl.where(point, al ^ bl, 0), tl.where(point, al ^ bl, 1)


@triton.jit
def select(cl, ch, al, ah, bl, bh):
    """``where(c, a, b)``: one branch when the condition is decided, else the union of both."""
    lo = tl.where(cl == 1, al, tl.where(ch == 0, bl, tl.minimum(al, bl)))
    hi = tl.where(cl == 1, ah, tl.where(ch == 0, bh, tl.maximum(ah, bh)))
    return lo, hi


# ---- gathers ---------------------------------------------------------------------------------------


@triton.jit
def wrap(lo, hi, size):
    """Index bounds after the mods' Python-style wrap and clamp into [0, size) (see tm.wrap_index)."""
    negative = hi < 0
    positive = lo >= 0
    wl = tl.where(negative, lo + size, tl.where(positive, lo, 0))
    wh = tl.where(negative, hi + size, tl.where(positive, hi, size - 1))
    wl = tl.minimum(tl.maximum(wl, 0), size - 1)
    wh = tl.minimum(tl.maximum(wh, 0), size - 1)
    return wl, wh


@triton.jit
def range_min_max(tmin, tmax, lg, row, lo, hi, rows, blocks, grain):
    """Min and max of a captured tensor over positions [lo, hi] (wrapped, int64) of one row.

    A sparse table (``compiler.range_tables.range_table``) holds, per level k, the min/max over 2**k
    consecutive grains of ``grain`` positions: (levels, rows, blocks) int64. Two overlapping windows
    of one level cover the grains of [lo, hi] (a superset of it: sound, and exact when lo and hi+1
    are multiples of ``grain``).
    """
    a = lo // grain
    c = hi // grain
    k = tl.load(lg + (c - a + 1))
    base = (k * rows + row) * blocks
    second = c - (tl.full((), 1, tl.int64) << k) + 1
    mn = tl.minimum(tl.load(tmin + base + a), tl.load(tmin + base + second))
    mx = tl.maximum(tl.load(tmax + base + a), tl.load(tmax + base + second))
    return mn, mx


# ---- float32 -----------------------------------------------------------------------------------------
# Exactly rounded IEEE operations are monotone, so bounds computed with the same operation contain
# the values eager PyTorch computes. Sums and differences are widened outward by F_EPS times their
# operands' magnitudes (generously above rounding: it also covers a compiler contracting a product
# into the sum, fma, in either place); quotients by F_EPS times the result (eager CUDA divides by a
# number as a multiply by its reciprocal); products, negation, abs, min/max, floor/ceil/trunc and
# casts are exact. Non-finite bounds become NaN (unknown).

F_EPS = tl.constexpr(2.0**-20)
F_TINY = tl.constexpr(2.0**-100)


@triton.jit
def f_known(lo, hi):
    """NaN bounds unless both are finite."""
    bad = (_i(tl.abs(lo) == float("inf")) | _i(tl.abs(hi) == float("inf")) | _i(lo != lo) | _i(hi != hi)) != 0
    return tl.where(bad, float("nan"), lo), tl.where(bad, float("nan"), hi)


@triton.jit
def _f_widen(lo, hi, scale):
    pad = scale * F_EPS + F_TINY
    return f_known(lo - pad, hi + pad)


@triton.jit
def _f_mag(lo, hi):
    return tl.maximum(tl.abs(lo), tl.abs(hi), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def f_add(al, ah, bl, bh):
    return _f_widen(al + bl, ah + bh, _f_mag(al, ah) + _f_mag(bl, bh))


@triton.jit
def f_sub(al, ah, bl, bh):
    return _f_widen(al - bh, ah - bl, _f_mag(al, ah) + _f_mag(bl, bh))


@triton.jit
def _f_corners(p1, p2, p3, p4):
    lo = tl.minimum(
        tl.minimum(p1, p2, propagate_nan=tl.PropagateNan.ALL),
        tl.minimum(p3, p4, propagate_nan=tl.PropagateNan.ALL),
        propagate_nan=tl.PropagateNan.ALL,
    )
    hi = tl.maximum(
        tl.maximum(p1, p2, propagate_nan=tl.PropagateNan.ALL),
        tl.maximum(p3, p4, propagate_nan=tl.PropagateNan.ALL),
        propagate_nan=tl.PropagateNan.ALL,
    )
    return lo, hi


@triton.jit
def f_mul(al, ah, bl, bh):
    lo, hi = _f_corners(al * bl, al * bh, ah * bl, ah * bh)
    return f_known(lo, hi)


@triton.jit
def f_div(al, ah, bl, bh, EXACT: tl.constexpr):
    """``a / b`` where ``b`` keeps one sign (else unknown); EXACT: b is a power of two (no rounding)."""
    ok = (_i(bl > 0) | _i(bh < 0)) != 0
    dl = tl.where(ok, bl, 1.0)
    dh = tl.where(ok, bh, 1.0)
    lo, hi = _f_corners(tl.div_rn(al, dl), tl.div_rn(al, dh), tl.div_rn(ah, dl), tl.div_rn(ah, dh))
    if EXACT:
        lo, hi = f_known(lo, hi)
    else:
        lo, hi = _f_widen(lo, hi, _f_mag(lo, hi))
    return tl.where(ok, lo, float("nan")), tl.where(ok, hi, float("nan"))


@triton.jit
def f_absolute(al, ah):
    lo = tl.where(_i(al >= 0) != 0, al, tl.where(_i(ah <= 0) != 0, -ah, 0.0))
    hi = tl.maximum(tl.abs(al), tl.abs(ah), propagate_nan=tl.PropagateNan.ALL)
    return f_known(tl.where(al != al, al, lo), hi)


@triton.jit
def f_minmax(al, ah, bl, bh, MAX: tl.constexpr):
    if MAX:
        return tl.maximum(al, bl, propagate_nan=tl.PropagateNan.ALL), tl.maximum(
            ah, bh, propagate_nan=tl.PropagateNan.ALL
        )
    return tl.minimum(al, bl, propagate_nan=tl.PropagateNan.ALL), tl.minimum(
        ah, bh, propagate_nan=tl.PropagateNan.ALL
    )


@triton.jit
def f_select(cl, ch, al, ah, bl, bh):
    lo = tl.where(cl == 1, al, tl.where(ch == 0, bl, tl.minimum(al, bl, propagate_nan=tl.PropagateNan.ALL)))
    hi = tl.where(cl == 1, ah, tl.where(ch == 0, bh, tl.maximum(ah, bh, propagate_nan=tl.PropagateNan.ALL)))
    return lo, hi


@triton.jit
def f_to_int(al, ah, LOW: tl.constexpr, HIGH: tl.constexpr):
    """Truncation toward zero into an integer dtype: known for values strictly inside (LOW, HIGH)."""
    ok = (_i(al > LOW) & _i(ah < HIGH)) != 0
    lo = tl.where(ok, al, 0.0).to(tl.int64)
    hi = tl.where(ok, ah, 0.0).to(tl.int64)
    return tl.where(ok, lo, I64_MIN), tl.where(ok, hi, I64_MAX)


@triton.jit
def f_truth(al, ah):
    """``x != 0`` of a float interval (NaN bounds: unknown)."""
    lo = _i(al > 0) | _i(ah < 0)
    hi = 1 - (_i(al == 0) & _i(ah == 0))
    return lo, hi


@triton.jit
def f_range_min_max(tmin, tmax, lg, row, lo, hi, rows, blocks, grain):
    """``range_min_max`` for float tables (NaN propagates: a NaN in the range makes it unknown)."""
    a = lo // grain
    c = hi // grain
    k = tl.load(lg + (c - a + 1))
    base = (k * rows + row) * blocks
    second = c - (tl.full((), 1, tl.int64) << k) + 1
    mn = tl.minimum(
        tl.load(tmin + base + a), tl.load(tmin + base + second), propagate_nan=tl.PropagateNan.ALL
    )
    mx = tl.maximum(
        tl.load(tmax + base + a), tl.load(tmax + base + second), propagate_nan=tl.PropagateNan.ALL
    )
    return f_known(mn, mx)
