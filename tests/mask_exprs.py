"""Random mask mods for property tests: hypothesis strategies over small Python expressions.

Integer expressions of q, kv, b, h and constants (``+ - * // %``, abs, min/max, gathers from a
captured table, ``where``, float round trips: ``/``, ``*``, floor and truncation back to int32),
compared and combined with ``& | ~`` into a mask. ``make_mod(expr)`` turns one into a mask_mod.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DEVICE = (
    "cuda" if torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1" else "cpu"
)

_TABLE = torch.randint(-4, 40, (11,), dtype=torch.int32)
_FTABLE = torch.tensor([-2.5, 0.0, 3.25, 17.0, 1e-3])


def int_exprs():
    """Source text of an int32 expression over ``b, h, q, kv``."""
    leaves = st.sampled_from(["q", "kv", "b", "h"]) | st.integers(-6, 30).map(lambda c: f"C({c})")

    def extend(inner):
        const = st.integers(-5, 9)
        divisor = st.sampled_from([1, 2, 3, 5, 8, -3])
        return (
            st.tuples(st.sampled_from(["+", "-"]), inner, inner).map(lambda t: f"({t[1]} {t[0]} {t[2]})")
            | st.tuples(inner, const).map(lambda t: f"({t[0]} * {t[1]})")
            | st.tuples(inner, divisor).map(lambda t: f"({t[0]} // {t[1]})")
            | st.tuples(inner, divisor).map(lambda t: f"({t[0]} % {t[1]})")
            | inner.map(lambda e: f"torch.abs({e})")
            | st.tuples(st.sampled_from(["minimum", "maximum"]), inner, inner).map(
                lambda t: f"torch.{t[0]}({t[1]}, {t[2]})"
            )
            | inner.map(lambda e: f"table[{e} % 11]")
            | st.tuples(inner, st.sampled_from([2, 3, 0.5, -4, 7.5])).map(
                lambda t: f"torch.floor({t[0]}.float() / {t[1]}).int()"
            )
            | st.tuples(
                inner, st.sampled_from([0.3, -1.5, 2.0, 1e-3]), st.sampled_from([0.0, 0.25, -3.5])
            ).map(lambda t: f"({t[0]}.float() * {t[1]} + {t[2]}).int()")
            | st.tuples(inner, inner).map(
                lambda t: f"torch.maximum({t[0]}.float(), ftable[{t[1]} % 5]).int()"
            )
            | st.tuples(bool_exprs(inner), inner, inner).map(lambda t: f"torch.where({t[0]}, {t[1]}, {t[2]})")
        )

    return st.recursive(leaves, extend, max_leaves=4)


def bool_exprs(ints):
    """Comparisons of ``ints`` combined with ``& | ~``."""
    compare = st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), ints, ints).map(
        lambda t: f"({t[1]} {t[0]} {t[2]})"
    )
    return st.recursive(
        compare,
        lambda inner: (
            st.tuples(st.sampled_from(["&", "|"]), inner, inner).map(lambda t: f"({t[1]} {t[0]} {t[2]})")
            | inner.map(lambda e: f"(~{e})")
        ),
        max_leaves=2,
    )


def make_mod(expr: str):
    table = _TABLE.to(DEVICE)
    source = f"def random_mask(b, h, q, kv):\n    return {expr}\n"
    scope = {"torch": torch, "table": table, "ftable": _FTABLE.to(DEVICE)}
    scope["C"] = lambda c: torch.tensor(c, dtype=torch.int32)
    exec(source, scope)  # noqa: S102 - test-generated expressions only
    return scope["random_mask"]


def mask_exprs():
    """Source text of a boolean mask expression over ``b, h, q, kv``."""
    return bool_exprs(int_exprs())
