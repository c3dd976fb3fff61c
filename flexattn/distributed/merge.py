"""Exact merging of partial attention results through their logsumexp.

Attention over keys split into parts i with partial results ``(out_i, lse_i)`` (each softmax-normalised
over its own keys) is ``lse = logsumexp_i(lse_i)``, ``out = sum_i exp(lse_i - lse) * out_i``. Rows
that see no key in any part keep ``out = 0`` and ``lse = -inf``; the arithmetic is max-shifted and
never forms ``-inf - -inf``.
"""

from __future__ import annotations

import math

import torch


class LseAccumulator:
    """Running merge of partials of one set of rows, in fp32 (fp64 for fp64 partials).

    ``add(out_i (B, H, L, Ev), lse_i (B, H, L))`` any number of times; ``out``/``lse`` are the merge so far
    (zeros / -inf before the first partial).
    """

    def __init__(self, shape_out: torch.Size, like: torch.Tensor):
        self.dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.out = torch.zeros(shape_out, dtype=self.dtype, device=like.device)
        self.lse = torch.full(shape_out[:-1], -math.inf, dtype=self.dtype, device=like.device)

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        lse = lse.to(self.dtype)
        new = _logaddexp(self.lse, lse)
        self.out = (
            self.out * weight(self.lse, new)[..., None] + out.to(self.dtype) * weight(lse, new)[..., None]
        )
        self.lse = new


def weight(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """``exp(lse_part - lse_total)``, 0 where the total is -inf (so where the part is too)."""
    seen = lse_total > -math.inf
    return torch.where(seen, torch.exp(lse_part - torch.where(seen, lse_total, 0.0)), 0.0)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top = torch.maximum(a, b)
    safe = torch.where(top > -math.inf, top, 0.0)
    total = torch.exp(a - safe) + torch.exp(b - safe)
    return torch.where(top > -math.inf, safe + torch.log(total), -math.inf)


def partial_grads(
    out_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, d_out, d_lse
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss with respect to one partial, from those of the merged result.

    With ``w = exp(lse_part - lse)``: ``d out_part = w * d_out`` and
    ``d lse_part = w * (rowsum(d_out * (out_part - out)) + d_lse)``.
    Shapes: out_* / d_out (B, H, L, Ev), lse_* / d_lse (B, H, L). Returns them in the partial's dtypes.
    """
    w = weight(lse_part.to(lse.dtype), lse)
    d_out_f = d_out.to(out.dtype)
    d_out_part = w[..., None] * d_out_f
    d_lse_part = w * ((d_out_f * (out_part.to(out.dtype) - out)).sum(-1) + d_lse.to(out.dtype))
    return d_out_part.to(out_part.dtype), d_lse_part.to(lse_part.dtype)
