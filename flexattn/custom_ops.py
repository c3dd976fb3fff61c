"""flexattn under ``torch.compile``: two ``torch.library`` custom ops and a traceable entry point.

Dynamo cannot trace the mod compiler or the kernel launchers, and an FX graph cannot hold a Python
callable, so :func:`traced_attention` (what ``flex_attention`` runs while Dynamo traces) keeps
only this in the graph:

1. ``register`` (run at trace time, its result baked in as a constant) compiles the mods and stores
   them, without their tensors, with the options under a string *handle*; it records the paths
   from each mod to everything its trace could read (``compiler/reach.py``).
2. Traced code reads along those paths: the captured tensors of both mods become graph inputs of
   the ops (new tensors, new shapes and in-place updates reach the kernels on every call), and the
   Python numbers, strings and functions the mods hold are compared with their values at trace
   time, so Dynamo guards on them. A new closure with new contents therefore either reuses the
   graph with its own tensors or recompiles; it never runs the first call's mod (issue #18).
3. ``flexattn::attention`` (fake implementation: output shapes only) runs the forward kernel; its
   registered autograd formula calls ``flexattn::attention_backward``. At run time both bind the
   stored mods to the tensors of the call (``compiler.bind_captures``).

Block sizes and the scale travel as int / float arguments of the ops, so new values need no
recompile. Limits: everything a mod reads must be reachable through closures, defaults, globals of
its module, attributes, lists or dicts; a tensor the mod computes while it runs (``w * 2``) cannot
be captured (compute it outside the mod); a mod defined *inside* the compiled function may read
tensors through globals but not through its closure (Dynamo cannot read the closure cells of such
a function): define it once outside, as in ``tests/test_custom_ops.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexattn.compiler import bind_captures, compile_mask_mod, compile_score_mod
from flexattn.compiler.checks import needs_vmap
from flexattn.compiler.reach import Reach, follow, reach
from flexattn.dispatch import check_call, check_mods_on_grid
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.mods import KernelMod
from flexattn.options import KernelOptions, fast_math_for
from flexattn.plan import AttentionPlan, block_tables

# flex_attention's checks of its mods and options run at trace time, their result a graph constant
# (marking here keeps torch._dynamo out of ``import flexattn``; api imports this module first).
torch._dynamo.assume_constant_result(check_call)
torch._dynamo.assume_constant_result(check_mods_on_grid)
torch._dynamo.assume_constant_result(needs_vmap)  # (mod_eval.vmap_mod: vmap or broadcast grids, per mod)


@dataclass(frozen=True)
class _Entry:
    """What a handle stands for: both mods compiled (bound to meta stand-ins), how to reach their
    values, and the options."""

    score_mod: KernelMod
    mask_mod: KernelMod
    score_reach: Reach
    mask_reach: Reach
    options: KernelOptions


_REGISTRY: dict[str, _Entry] = {}
_HANDLES: dict[tuple, str] = {}
_NO_REACH = Reach((), (), ())


@torch._dynamo.assume_constant_result
def register(score_mod, mask_mod, kernel_options, device, dtype) -> str:
    """Compile the call's mods and store them with the options; their handle (a graph constant).

    Traced graphs hold no user tensor through the registry: the stored mods are bound to meta
    tensors, and the handle is keyed by the generated code and the reach (paths and scalar values).
    """
    options = KernelOptions.from_user(kernel_options)
    score = compile_score_mod(score_mod, device=device, fast_math=fast_math_for(options, dtype))
    mask = compile_mask_mod(mask_mod, device=device)
    score_reach = _NO_REACH if score_mod is None else reach(score_mod, score.captures, "the score_mod")
    mask_reach = _NO_REACH if mask_mod is None else reach(mask_mod, mask.captures, "the mask_mod")
    key = (id(score.fn), id(mask.fn), score.grad_slots, _typed(score_reach), _typed(mask_reach), options)
    handle = _HANDLES.get(key)
    if handle is None:
        handle = _HANDLES[key] = f"flexattn-{len(_HANDLES)}"
        _REGISTRY[handle] = _Entry(_on_meta(score), _on_meta(mask), score_reach, mask_reach, options)
    return handle


def _typed(r: Reach) -> tuple:
    """``r`` as a key in which 1, 1.0 and True differ (they trace to different code)."""
    return (r.tensors, tuple((path, type(v).__name__, v) for path, v in r.scalars), r.functions)


def _on_meta(kernel_mod: KernelMod) -> KernelMod:
    stand_ins = tuple(
        torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
        for t in kernel_mod.captures
    )
    return bind_captures(kernel_mod, stand_ins, check=False)


@torch._dynamo.assume_constant_result
def _reach_of(handle: str, kind: str) -> tuple:
    entry = _REGISTRY[handle]
    r = entry.score_reach if kind == "score" else entry.mask_reach
    return _typed(r)


def _observe(mod, tensor_paths, scalars, functions) -> list[Tensor]:
    """Traced by Dynamo: the mod's captured tensors, after making Dynamo guard on its scalars
    (value and type) and functions (code). The raises cannot happen while tracing: the values were
    recorded from these very objects; a later call whose values differ fails the guards instead."""
    for path, type_name, value in scalars:
        got = follow(mod, path)
        # Only `==` here: torch 2.11's `!=` polyfill asks for guards on the recorded values, which
        # come from a constant source (the graph fails to compile)
        same_value = got == value if value == value else not (got == got)  # noqa: SIM201
        if not (type(got).__name__ == type_name and same_value):
            raise RuntimeError(f"flexattn: a mod's value at {path} changed while torch.compile traced it")
    for path in functions:
        if not callable(follow(mod, path)):
            raise RuntimeError(f"flexattn: a mod's function at {path} changed while torch.compile traced it")
    return [follow(mod, path) for path in tensor_paths]


def traced_attention(query, key, value, score_mod, block_mask, scale: float, kernel_options):
    """``(out, lse, max_scores)`` through the custom ops; the code Dynamo traces for flex_attention.

    ``scale`` is the checked float (flexattn.api resolves the default).
    """
    mask_mod = None if block_mask is None else block_mask.mask_mod
    handle = register(score_mod, mask_mod, kernel_options, query.device, query.dtype)
    score_captures = _observe(score_mod, *_reach_of(handle, "score"))
    mask_captures = _observe(mask_mod, *_reach_of(handle, "mask"))
    if block_mask is None:
        tables, (q_block, kv_block) = [None] * len(BlockTables.TENSORS), (0, 0)
    else:
        # The tables as held: a q side not built yet crosses the op as None and the backward op derives
        # it on the device (AttentionPlan.backward_tables), per call. Building it here instead would put
        # the build and a mutation of the user's BlockMask into Dynamo's trace; inference never needs it.
        tables = block_mask.tables(q_side=False).tensors()
        q_block, kv_block = block_mask.BLOCK_SIZE
    return torch.ops.flexattn.attention(
        query, key, value, score_captures, mask_captures, *tables, q_block, kv_block, scale, handle
    )


# ---- the custom ops ----------------------------------------------------------------------------


def _runtime_plan(handle: str, query, key, score_captures, mask_captures, tables, q_block, kv_block, scale):
    entry = _REGISTRY[handle]
    if tables[0] is None:
        lists = block_tables(None, query.shape[2], key.shape[2], query.device)
    else:
        lists = BlockTables.from_tensors(tables, q_block, kv_block)
    score = bind_captures(entry.score_mod, tuple(score_captures))
    mask = bind_captures(entry.mask_mod, tuple(mask_captures))
    return AttentionPlan(score, mask, lists, scale, entry.options)


@torch.library.custom_op("flexattn::attention", mutates_args=())
def attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_captures: list[Tensor],
    mask_captures: list[Tensor],
    kv_num_blocks: Tensor | None,
    kv_indices: Tensor | None,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    q_block: int,
    kv_block: int,
    scale: float,
    handle: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernel: ``(out, lse, max_scores)``. Block tables None: attend everywhere."""
    tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    tables += (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    plan = _runtime_plan(handle, query, key, score_captures, mask_captures, tables, q_block, kv_block, scale)
    return plan.forward(query, key, value)


@attention_op.register_fake
def _attention_fake(query, key, value, *rest):
    B, Hq, Lq, _ = query.shape
    out = query.new_empty((B, Hq, Lq, value.shape[-1]))
    return (
        out,
        query.new_empty((B, Hq, Lq), dtype=torch.float32),
        query.new_empty((B, Hq, Lq), dtype=torch.float32),
    )


@torch.library.custom_op("flexattn::attention_backward", mutates_args=())
def attention_backward_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    score_captures: list[Tensor],
    mask_captures: list[Tensor],
    kv_num_blocks: Tensor | None,
    kv_indices: Tensor | None,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    q_block: int,
    kv_block: int,
    scale: float,
    handle: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Backward kernels: ``(dq, dk, dv, [d capture])``, one gradient per learnable score capture
    (``KernelMod.grad_captures`` order), each in its tensor's dtype."""
    tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    tables += (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    plan = _runtime_plan(handle, query, key, score_captures, mask_captures, tables, q_block, kv_block, scale)
    learnable = plan.score_mod.grad_captures
    buffers = tuple(torch.zeros(c.shape, device=c.device, dtype=torch.float32) for c in learnable)
    dq, dk, dv = plan.backward(query, key, value, out, lse, dout, dlse, buffers)
    return dq, dk, dv, [torch.empty_like(c).copy_(b) for b, c in zip(buffers, learnable)]  # as the fake


@attention_backward_op.register_fake
def _attention_backward_fake(query, key, value, out, lse, dout, dlse, score_captures, mask_captures, *rest):
    handle = rest[-1]
    grads = [torch.empty_like(score_captures[s]) for s in _REGISTRY[handle].score_mod.grad_slots]
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), grads


def _setup_context(ctx, inputs, output):
    query, key, value, score_captures, mask_captures, *tables = inputs[: 5 + len(BlockTables.TENSORS)]
    ctx.q_block, ctx.kv_block, ctx.scale, ctx.handle = inputs[5 + len(BlockTables.TENSORS) :]
    out, lse, _ = output
    ctx.save_for_backward(query, key, value, out, lse, *score_captures, *mask_captures, *tables)
    ctx.num_captures = (len(score_captures), len(mask_captures))


def _backward(ctx, dout, dlse, _dmax):
    query, key, value, out, lse, *rest = ctx.saved_tensors
    n_score, n_mask = ctx.num_captures
    score_captures, mask_captures = rest[:n_score], rest[n_score : n_score + n_mask]
    tables = rest[n_score + n_mask :]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, learnable_grads = attention_backward_op(
        query, key, value, out, lse, dout, dlse, list(score_captures), list(mask_captures), *tables,
        ctx.q_block, ctx.kv_block, ctx.scale, ctx.handle,
    )  # fmt: skip
    score_grads: list = [None] * n_score
    for slot, grad in zip(_REGISTRY[ctx.handle].score_mod.grad_slots, learnable_grads):
        score_grads[slot] = grad
    no_grads = [None] * (len(BlockTables.TENSORS) + 4)  # the tables, block sizes, scale and handle
    return (dq, dk, dv, score_grads, [None] * n_mask, *no_grads)


attention_op.register_autograd(_backward, setup_context=_setup_context)
