"""Shared test helpers: the three-way comparison and random inputs for a shape spec.

The three-way rule (design notes §5): compute a float64 *gold* result with the reference backend,
the same math *eagerly in the test dtype*, and the result under test. Pass when

    err(actual, gold) <= k * err(eager, gold) + floor

with ``err`` the max abs difference divided by the largest |gold| value (so outputs, lse and
gradients of any magnitude are judged alike). Infinities must sit at the same places with the same
sign, and NaN fails outright.

Typical use::

    q, k, v = make_qkv(Shape(B=2, Hq=4, Lq=97, E=64), torch.float16)
    gold, eager = gold_and_eager(q, k, v, score_mod=mods.score_mod, block_mask=mask)
    out, lse = flex_attention(q, k, v, ..., return_lse=True)
    assert_close_to_gold(out, gold.out, eager.out, name="out")
    assert_close_to_gold(lse, gold.lse, eager.lse, name="lse")
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from flexattn.reference import reference_attention

# Default k and floor per dtype of the result under test.
DEFAULT_K = 3.0
DEFAULT_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def rel_err(x: torch.Tensor, gold: torch.Tensor) -> float:
    """max |x - gold| / max |gold| over positions where gold is finite (1 if gold is all zero)."""
    finite = torch.isfinite(gold)
    if not bool(finite.any()):
        return 0.0
    g = gold.double()[finite]
    diff = (x.double()[finite] - g).abs().max().item()
    scale = g.abs().max().item()
    return diff / (scale if scale > 0 else 1.0)


def reduction_floor(q, k, v, score_mod, block_mask, scale, dout, param: torch.Tensor) -> float:
    """The floor for the gradient of a 0-dim captured ``param`` (``score * temperature``), relative
    to its gold value: ``3 * eps32 * log2(N) * sqrt(sum t_n**2) / |sum t_n|``.

    That gradient is one fp32 sum of N terms ``t_n = dL/ds_n * ds_n/dparam`` over the score grid,
    so its error is a single draw of that sum's rounding, and ``k * err(eager)`` (eager's draw) can
    be far below any other summation order's (seen: 11x). Blocked / pairwise summation (torch's
    reductions, the engines' per-tile sums) rounds each of its ~log2(N) levels of partial sums,
    whose sizes are ~``sqrt(sum t**2)`` when the signs are mixed: an error of about ``eps * log2(N) *
    sqrt(sum t**2)``, taken three times; dividing by ``|sum t|`` counts the cancellation. The terms come from
    float64: ``dL/ds`` as the gradient of a zero probe added to the mod, ``ds/dparam`` by central
    differences of the mod (``param`` is put back exactly). ``q, k, v, dout``: the test's inputs.
    """
    from flexattn.mod_eval import eval_score_mod, index

    B, Hq, Lq, E = q.shape
    Lkv = k.shape[2]
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    scale = 1 / math.sqrt(E) if scale is None else scale
    probe = torch.zeros(B, Hq, Lq, Lkv, dtype=torch.float64, requires_grad=True)

    def probed(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx, kv_idx) + probe[b, h, q_idx, kv_idx]

    out, _, _ = reference_attention(q64, k64, v64, probed, block_mask, scale)
    (ds,) = torch.autograd.grad(out, probe, dout.double())
    raw = q64 @ k64.repeat_interleave(Hq // k.shape[1], dim=1).transpose(-1, -2) * scale
    kept, h = param.detach().clone(), 1e-3 * max(1.0, abs(param.item()))
    grids = []
    with torch.no_grad():
        for step in (h, -h):
            param.copy_(kept + step)
            grids.append(eval_score_mod(score_mod, raw, index(0, Lq, "cpu"), index(0, Lkv, "cpu")).double())
        param.copy_(kept)
    terms = ds * (grids[0] - grids[1]) / (2 * h)
    total = abs(terms.sum().item())
    spread = math.log2(max(2, terms.numel())) * math.sqrt(terms.square().sum().item())
    return 3.0 * torch.finfo(torch.float32).eps * spread / max(total, 1e-300)


def assert_close_to_gold(
    actual: torch.Tensor,
    gold: torch.Tensor,
    eager: torch.Tensor,
    *,
    k: float | None = None,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Fail unless ``err(actual, gold) <= k * err(eager, gold) + floor`` (module docstring).

    Args:
        actual: the result under test; gold: float64 reference; eager: same math in the test dtype.
        k: allowed factor over eager's error (default 3).
        floor: absolute slack on the normalised error (default by actual's dtype, DEFAULT_FLOOR).
        name: what is compared, for the message (e.g. "out", "lse", "dq").
    """
    assert actual.shape == gold.shape == eager.shape, (
        f"{name}: shapes differ: actual {tuple(actual.shape)}, gold {tuple(gold.shape)}, "
        f"eager {tuple(eager.shape)}"
    )
    assert not bool(torch.isnan(actual).any()), f"{name}: actual has NaN at {_first(torch.isnan(actual))}"
    assert not bool(torch.isnan(gold).any()), f"{name}: gold has NaN (broken test input?)"
    gold_inf = torch.isinf(gold)
    same_inf = torch.equal(torch.isinf(actual), gold_inf) and torch.equal(
        actual.double()[gold_inf], gold.double()[gold_inf]
    )
    assert same_inf, f"{name}: infinities differ from gold, e.g. at {_first(torch.isinf(actual) != gold_inf)}"
    k = DEFAULT_K if k is None else k
    floor = DEFAULT_FLOOR.get(actual.dtype, 1e-5) if floor is None else floor
    err_actual, err_eager = rel_err(actual, gold), rel_err(eager, gold)
    bound = k * err_eager + floor
    if err_actual > bound:
        diff = torch.where(torch.isfinite(gold), (actual.double() - gold.double()).abs(), 0.0)
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: err(actual)={err_actual:.3e} > {k} * err(eager)={err_eager:.3e} + {floor:.1e} "
            f"(bound {bound:.3e}); worst at {where}: actual {actual[where].item():.6g}, "
            f"gold {gold[where].item():.6g}, eager {eager[where].item():.6g}"
        )


def _first(mask: torch.Tensor) -> tuple[int, ...] | None:
    idx = mask.nonzero()
    return tuple(idx[0].tolist()) if len(idx) else None


@dataclass(frozen=True)
class Shape:
    """An attention problem size. Hkv defaults to Hq, Lkv to Lq, Ev to E."""

    B: int = 1
    Hq: int = 1
    Lq: int = 16
    E: int = 16
    Hkv: int | None = None
    Lkv: int | None = None
    Ev: int | None = None

    @property
    def hkv(self) -> int:
        return self.Hq if self.Hkv is None else self.Hkv

    @property
    def lkv(self) -> int:
        return self.Lq if self.Lkv is None else self.Lkv

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    @property
    def id(self) -> str:
        """Readable test id, e.g. ``B2-H8/2-L97/130-E64/32``."""
        heads = f"H{self.Hq}" if self.hkv == self.Hq else f"H{self.Hq}/{self.hkv}"
        lengths = f"L{self.Lq}" if self.lkv == self.Lq else f"L{self.Lq}/{self.lkv}"
        dims = f"E{self.E}" if self.ev == self.E else f"E{self.E}/{self.ev}"
        return f"B{self.B}-{heads}-{lengths}-{dims}"


DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_qkv(
    shape: Shape,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q (B, Hq, Lq, E), k (B, Hkv, Lkv, E), v (B, Hkv, Lkv, Ev) ~ N(0, 1)."""
    q = torch.randn(shape.B, shape.Hq, shape.Lq, shape.E, device=device).to(dtype)
    k = torch.randn(shape.B, shape.hkv, shape.lkv, shape.E, device=device).to(dtype)
    v = torch.randn(shape.B, shape.hkv, shape.lkv, shape.ev, device=device).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


class Result(NamedTuple):
    """Forward results (and, when asked, gradients) of one attention run."""

    out: torch.Tensor
    lse: torch.Tensor
    grads: tuple[torch.Tensor | None, ...] = ()


def run_reference(
    q, k, v, *, score_mod=None, block_mask=None, scale=None, compute_dtype=None, dout=None, params=()
) -> Result:
    """Reference forward; with ``dout`` also d(out·dout)/d(q, k, v, *params)."""
    leaves = [q, k, v, *params]
    if dout is None:
        with torch.no_grad():
            out, lse, _ = reference_attention(
                q, k, v, score_mod, block_mask, scale, compute_dtype=compute_dtype
            )
        return Result(out, lse)
    out, lse, _ = reference_attention(q, k, v, score_mod, block_mask, scale, compute_dtype=compute_dtype)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return Result(out.detach(), lse.detach(), grads)


def gold_and_eager(
    q, k, v, *, score_mod=None, block_mask=None, scale=None, dout=None, params=()
) -> tuple[Result, Result]:
    """The gold (float64) and eager (input dtype) legs of the three-way comparison.

    ``q, k, v`` are the test-dtype inputs (any requires_grad); ``params`` are captured tensors of
    the score_mod whose gradients are wanted (their own dtype is kept). With ``dout`` (the upstream
    gradient of ``out``) the results carry gradients for (q, k, v, *params), each in the dtype
    of that leaf (gold's in float64 for q, k, v).
    """
    gold_leaves = [t.detach().double().requires_grad_(dout is not None) for t in (q, k, v)]
    eager_leaves = [t.detach().requires_grad_(dout is not None) for t in (q, k, v)]
    gold = run_reference(
        *gold_leaves, score_mod=score_mod, block_mask=block_mask, scale=scale, dout=dout, params=params
    )
    eager = run_reference(
        *eager_leaves,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        compute_dtype=q.dtype,
        dout=dout,
        params=params,
    )
    return gold, eager


def load_script(path: Path):
    """Import a script of benchmarks/ or examples/ (not packages) by its file path, registered under
    its stem in ``sys.modules`` (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
