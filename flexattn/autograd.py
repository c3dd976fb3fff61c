"""Autograd for the Triton path: forward and backward kernels behind one ``torch.autograd.Function``.

``triton_flex_attention`` (called by flexattn.dispatch) compiles the mods, then

- with no input requiring grad (inference), runs the forward kernel and saves nothing;
- otherwise runs :class:`FlexAttentionFunction`, whose inputs are q, k, v and the score_mod's
  captured tensors that require grad (learnable biases), so autograd routes their gradients. The
  backward kernels accumulate those gradients in fp32 buffers (64-bit fixed point with
  ``kernel_options={"deterministic": True}``) and return them in each tensor's dtype.

Double backward (``create_graph=True`` through flex attention, then differentiating the
gradients) raises an error that says so. Under ``torch.compile`` the call goes through the
``flexattn::`` custom ops of :mod:`flexattn.custom_ops`, which wrap the same two functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C import _functions

from flexattn.block_mask import BlockMask
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.positions import Positions
from flexattn.options import KernelOptions
from flexattn.plan import AttentionPlan, plan_attention

DOUBLE_BACKWARD_ERROR = (
    b"flexattn: double backward through flex_attention is not supported (its backward kernels are "
    b"not differentiable). Compute gradients without create_graph=True, or use "
    b"kernel_options={'BACKEND': 'REFERENCE'} for higher-order gradients."
)


class FlexAttentionFunction(torch.autograd.Function):
    """``apply(query, key, value, plan, *captures) -> (out, lse, max_scores)``.

    ``captures`` are ``plan.score_mod.grad_captures`` (the tensors the kernels read through the
    mod's arguments), passed again here only so that autograd links their gradients.
    ``max_scores`` is not differentiable; gradients flow through ``out`` and ``lse``.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan: AttentionPlan, *captures):
        out, lse, max_scores = plan.forward(query, key, value, needs_grad=True)
        ctx.mark_non_differentiable(max_scores)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, key, value, out, lse, *captures)  # captures: in-place edits are caught
        ctx.plan = plan
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, dout, dlse, _dmax):
        query, key, value, out, lse, *captures = ctx.saved_tensors
        with torch.no_grad():
            if dout is None:
                dout = torch.zeros_like(out)
            buffers = tuple(torch.zeros(c.shape, device=c.device, dtype=torch.float32) for c in captures)
            dq, dk, dv = ctx.plan.backward(query, key, value, out, lse, dout, dlse, buffers)
            grads = (dq, dk, dv, *(b.to(c.dtype) for b, c in zip(buffers, captures)))
        if torch.is_grad_enabled():  # create_graph=True: make any use of these gradients fail clearly
            grads = _error_on_double_backward(grads)
        return (*grads[:3], None, *grads[3:])


def _error_on_double_backward(grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Aliases of ``grads`` whose own backward raises DOUBLE_BACKWARD_ERROR."""
    err_fn = _functions.DelayedError(DOUBLE_BACKWARD_ERROR, len(grads))
    aliases = [g.detach().requires_grad_() for g in grads]
    out = err_fn(*aliases)
    return out if isinstance(out, tuple) else (out,)


def triton_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    scale: float,
    options: KernelOptions,
    *,
    kv_pages: PagedKV | None = None,
    fingerprints=None,
    positions: Positions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flex attention on the Triton kernels, differentiable in q, k, v and learnable captures.
    Inference calls run the kernel ``AttentionPlan.choose`` names (prefill or split-KV decode);
    ``positions`` (inference only) go to the decode kernel.

    Args: as :func:`flexattn.dispatch.run_attention` (validated by flexattn.api; the kernels read the
    GQA group size from the shapes). With ``kv_pages`` (paged caches) only the forward runs: the api
    refuses paged calls that need gradients.
    Returns: out (B, Hq, Lq, Ev) in query's dtype; lse, max_scores (B, Hq, Lq) fp32.

    Example (CPU, ``TRITON_INTERPRET=1``)::

        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
        out, lse, _ = triton_flex_attention(q, k, v, None, mask, 0.25, KernelOptions(BACKEND="TRITON"))
    """
    kv_len = key.shape[2] if kv_pages is None else kv_pages.kv_len
    plan = plan_attention(
        score_mod, block_mask, query.shape[2], kv_len, scale, options, query.device, query.dtype,
        kv_pages=kv_pages, fingerprints=fingerprints,
    )  # fmt: skip
    captures = plan.score_mod.grad_captures
    grads = query.requires_grad or key.requires_grad or value.requires_grad  # (q, k, v without a generator)
    needs_grad = torch.is_grad_enabled() and (grads or any(t.requires_grad for t in captures))
    if not needs_grad:
        return plan.forward(query, key, value, positions=positions)
    if positions is not None:
        plan.forward(query, key, value, positions=positions, needs_grad=True)  # raises: no backward
    return FlexAttentionFunction.apply(query, key, value, plan, *captures)
