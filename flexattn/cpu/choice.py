"""Which CPU engine runs a call, and why (a pure function; ``dispatch.explain_backend`` prints it).

- ``sdpa``: no score_mod, or an additive one (``score + f(b, h, q_idx, kv_idx)``, found by the mod
  compiler, ``compiler/additive.py``) whose captured tensors need no gradient: PyTorch's fused CPU
  flash kernel per chunk, the mask and ``f`` as its float attn_mask (``cpu/sdpa_engine.py``).
- ``fused``: every other score_mod (soft-capping's tanh, a ``where`` on the score, a product), a
  learnable captured tensor (the flash backward gives no score gradient) or ``max_scores`` asked
  for (the flash kernel does not return it): chunked fp32 matmul + mod + softmax
  (``cpu/fused_engine.py``).
- ``reference``: float64 (the test oracle's precision stays on the oracle), calls traced by
  ``torch.compile`` (the fast path reads the block tables on the host; Dynamo traces the reference
  backend's plain PyTorch instead), ``Positions`` (query offsets, ragged key lengths) and paged KV
  caches, which the reference backend implements one sequence at a time / by gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENGINES = ("sdpa", "fused", "reference")


@dataclass(frozen=True)
class CpuChoice:
    """``engine`` (one of ENGINES) and the reason, for ``explain``."""

    engine: str
    reason: str

    def __str__(self) -> str:
        return f"{self.engine}: {self.reason}"


def choose_cpu_engine(
    *, dtype: torch.dtype, compiling: bool = False, positions: bool = False, paged: bool = False,
    score_kind: str = "none", score_name: str = "", learnable: bool = False, want_max: bool = False,
) -> CpuChoice:  # fmt: skip
    """The engine for a CPU call.

    ``score_kind``: "none" (no score_mod, or the identity), "additive" or "general";
    ``learnable``: a captured tensor of the score_mod needs its gradient; ``want_max``: the caller
    asked for max_scores.

    Example:
        >>> str(choose_cpu_engine(dtype=torch.float32))
        'sdpa: mask only: the fused CPU flash kernel per chunk of query rows'
    """
    if dtype == torch.float64:
        return CpuChoice("reference", "float64 inputs run on the reference backend (the test oracle)")
    if compiling:
        return CpuChoice("reference", "under torch.compile Dynamo traces the reference backend's PyTorch")
    if positions:
        return CpuChoice("reference", "Positions (query offsets / key lengths) run on the reference backend")
    if paged:
        return CpuChoice("reference", "paged KV caches are gathered by the reference backend")
    if want_max:
        return CpuChoice("fused", "max_scores requested (the CPU flash kernel does not return it)")
    if score_kind == "general":
        return CpuChoice(
            "fused", f"score_mod {score_name!r} is not additive (score + f(b, h, q_idx, kv_idx))"
        )
    if learnable:
        return CpuChoice("fused", f"score_mod {score_name!r} has captured tensors that need gradients")
    if score_kind == "additive":
        return CpuChoice("sdpa", f"additive score_mod {score_name!r}: its bias and the mask as SDPA's float "
                                 "attn_mask, per chunk of query rows")  # fmt: skip
    return CpuChoice("sdpa", "mask only: the fused CPU flash kernel per chunk of query rows")
