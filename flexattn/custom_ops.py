"""flexattn under ``torch.compile``: two ``torch.library`` custom ops and a traceable entry point.

Dynamo cannot trace the mod compiler or the kernel launchers, and an FX graph cannot hold a Python
callable, so :func:`traced_attention` (what ``flex_attention`` runs while Dynamo traces) keeps
only this in the graph:

1. ``register`` (run once per mod pair at trace time, result baked in as a constant) stores the
   user's mods, scale and options in a registry under a string *handle*, compiles them once to
   find the captured tensors that require grad, and records how to reach each of them from the
   score_mod (closure cells, globals, attributes).
2. Those tensors are fetched along the recorded paths in traced code, so Dynamo lifts them as
   graph inputs (parameters stay parameters) and AOTAutograd routes their gradients.
3. ``flexattn::attention`` (fake implementation: output shapes only) runs the forward kernel;
   its registered autograd formula calls ``flexattn::attention_backward``. At run time both look
   the handle up and compile the mods (cached by structure) against the tensors the mods capture.

Limits: a captured tensor that requires grad must be reachable from the score_mod through closures,
globals, attributes, lists or dicts (depth <= 4). A score_mod defined *inside* the compiled function
may read learnable tensors through globals, but not through its closure (Dynamo cannot read the
closure cells of such a function): define it once outside (e.g. in ``__init__``), as in
``tests/test_custom_ops.py``. Tensors computed inside the compiled region cannot be captured.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flexattn.autograd import plan_attention
from flexattn.block_mask import BlockMask, noop_block_mask, noop_mask
from flexattn.compiler import compile_score_mod
from flexattn.options import KernelOptions

MASK_FIELDS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    score_mod: Callable | None
    mask_mod: Callable
    block_size: tuple[int, int] | None
    scale: float
    options: KernelOptions
    capture_paths: tuple[tuple[tuple[str, Any], ...], ...]


_REGISTRY: dict[str, _Entry] = {}


@torch._dynamo.assume_constant_result
def register(score_mod, mask_mod, block_size, scale, head_dim, kernel_options, device) -> str:
    """Store the call's non-tensor arguments; return their handle (a constant in the traced graph)."""
    options = KernelOptions.from_user(kernel_options)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    mask_mod = noop_mask if mask_mod is None else mask_mod
    key = f"flexattn-{id(score_mod):x}-{id(mask_mod):x}-{block_size}-{scale!r}-{hash(options):x}"
    if key not in _REGISTRY:
        learnable = compile_score_mod(score_mod, device=device).grad_captures
        paths = tuple(_path_to(score_mod, t) for t in learnable)
        _REGISTRY[key] = _Entry(score_mod, mask_mod, block_size, scale, options, paths)
    return key


@torch._dynamo.assume_constant_result
def capture_paths(handle: str) -> tuple:
    """How to reach each learnable captured tensor from the score_mod (constants for Dynamo)."""
    return _REGISTRY[handle].capture_paths


def traced_attention(query, key, value, score_mod, block_mask, scale, kernel_options):
    """``(out, lse, max_scores)`` through the custom ops; the code Dynamo traces for flex_attention."""
    mask_mod = None if block_mask is None else block_mask.mask_mod
    block_size = None if block_mask is None else tuple(block_mask.BLOCK_SIZE)
    handle = register(score_mod, mask_mod, block_size, scale, query.shape[-1], kernel_options, query.device)
    captures = [_follow(score_mod, path) for path in capture_paths(handle)]
    tensors = (
        [None] * len(MASK_FIELDS) if block_mask is None else [getattr(block_mask, f) for f in MASK_FIELDS]
    )
    return torch.ops.flexattn.attention(query, key, value, captures, *tensors, handle)


def _follow(obj, path):
    # Traced by Dynamo. A "cell" step fails there ("Observed exception ... AttributeError") when the
    # score_mod was defined inside the compiled function: see the module docstring's limits.
    for kind, key in path:
        if kind == "cell":
            obj = obj.__closure__[key].cell_contents
        elif kind == "global":  # through sys.modules: Dynamo cannot read __globals__ of inner functions
            obj = getattr(sys.modules[obj.__module__], key)
        elif kind == "attr":
            obj = getattr(obj, key)
        else:
            obj = obj[key]
    return obj


def _path_to(root, target: Tensor, depth: int = 4):
    """A path from ``root`` (a function) to the tensor object ``target``; raises if there is none."""
    frontier, seen = [(root, ())], {id(root)}
    for _ in range(depth + 1):
        next_frontier = []
        for obj, path in frontier:
            if obj is target:
                return path
            for step, child in _children(obj):
                if id(child) not in seen and not isinstance(child, (types.ModuleType, type, str, int, float)):
                    seen.add(id(child))
                    next_frontier.append((child, (*path, step)))
        frontier = next_frontier
    raise RuntimeError(
        f"flexattn under torch.compile: the score_mod {getattr(root, '__name__', root)!r} captures a tensor "
        f"that requires grad (shape {tuple(target.shape)}) that cannot be found through its closure, globals "
        "or attributes. Capture the tensor (or the module owning it) directly in the score_mod's closure."
    )


def _children(obj):
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                yield ("cell", i), cell.cell_contents
            except ValueError:  # an empty cell
                continue
        module = sys.modules.get(obj.__module__)
        if module is not None and getattr(module, "__dict__", None) is obj.__globals__:
            for name in obj.__code__.co_names:
                if name in obj.__globals__:
                    yield ("global", name), obj.__globals__[name]
    elif isinstance(obj, torch.nn.Module):
        for name, child in (*obj._parameters.items(), *obj._buffers.items(), *obj._modules.items()):
            yield ("attr", name), child
    elif isinstance(obj, (list, tuple)):
        yield from ((("item", i), child) for i, child in enumerate(obj))
    elif isinstance(obj, dict):
        yield from ((("item", k), v) for k, v in obj.items() if isinstance(k, (str, int)))
    elif hasattr(obj, "__dict__") and not isinstance(obj, Tensor):
        yield from ((("attr", k), v) for k, v in vars(obj).items())


# ---- the custom ops ----------------------------------------------------------------------------


def _runtime_plan(handle: str, query: Tensor, key: Tensor, mask_tensors):
    entry = _REGISTRY[handle]
    if mask_tensors[0] is None:
        block_mask = noop_block_mask(query.shape[2], key.shape[2], query.device)
    else:
        block_mask = BlockMask(
            seq_lengths=(query.shape[2], key.shape[2]),
            **dict(zip(MASK_FIELDS, mask_tensors)),
            BLOCK_SIZE=entry.block_size,
            mask_mod=entry.mask_mod,
        )
    return plan_attention(entry.score_mod, block_mask, entry.scale, entry.options, query.device, query.dtype)


@torch.library.custom_op("flexattn::attention", mutates_args=())
def attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    captures: list[Tensor],
    kv_num_blocks: Tensor | None,
    kv_indices: Tensor | None,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    handle: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernel: ``(out, lse, max_scores)``. ``captures`` only carry autograd's dependencies."""
    masks = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    masks += (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    return _runtime_plan(handle, query, key, masks).forward(query, key, value)


@attention_op.register_fake
def _attention_fake(query, key, value, captures, *masks_and_handle):
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
    captures: list[Tensor],
    kv_num_blocks: Tensor | None,
    kv_indices: Tensor | None,
    full_kv_num_blocks: Tensor | None,
    full_kv_indices: Tensor | None,
    q_num_blocks: Tensor | None,
    q_indices: Tensor | None,
    full_q_num_blocks: Tensor | None,
    full_q_indices: Tensor | None,
    handle: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Backward kernels: ``(dq, dk, dv, [d capture])``, each gradient in its tensor's dtype."""
    masks = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    masks += (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    plan = _runtime_plan(handle, query, key, masks)
    if len(plan.score_mod.grad_captures) != len(captures):
        raise RuntimeError(
            f"flexattn: the score_mod now has {len(plan.score_mod.grad_captures)} learnable captures, "
            f"but {len(captures)} when torch.compile traced it. Keep requires_grad of captured tensors fixed."
        )
    buffers = tuple(torch.zeros(c.shape, device=c.device, dtype=torch.float32) for c in captures)
    dq, dk, dv = plan.backward(query, key, value, out, lse, dout, dlse, buffers)
    return dq, dk, dv, [torch.empty_like(c).copy_(b) for b, c in zip(buffers, captures)]  # as the fake


@attention_backward_op.register_fake
def _attention_backward_fake(query, key, value, out, lse, dout, dlse, captures, *masks_and_handle):
    grads = [torch.empty_like(c) for c in captures]
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), grads


def _setup_context(ctx, inputs, output):
    query, key, value, captures, *masks, handle = inputs
    out, lse, _ = output
    ctx.save_for_backward(query, key, value, out, lse, *captures, *masks)
    ctx.num_captures = len(captures)
    ctx.handle = handle


def _backward(ctx, dout, dlse, _dmax):
    query, key, value, out, lse, *rest = ctx.saved_tensors
    captures, masks = rest[: ctx.num_captures], rest[ctx.num_captures :]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dcaptures = attention_backward_op(
        query, key, value, out, lse, dout, dlse, list(captures), *masks, ctx.handle
    )
    return (dq, dk, dv, dcaptures, *([None] * len(MASK_FIELDS)), None)


attention_op.register_autograd(_backward, setup_context=_setup_context)
