"""Code generation: a traced ``Program`` (and its gradient) -> Triton device functions as source.

The generated module holds one ``@triton.jit`` function per entry point, with the calling
conventions of ``flexattn.kernels.mods``::

    score_fn(score, b, h, q_idx, kv_idx, caps) -> fp32, full [BLOCK_M, BLOCK_N]
    mask_fn(b, h, q_idx, kv_idx, caps) -> int1, broadcast to [BLOCK_M, BLOCK_N]
    score_grad_fn(score, b, h, q_idx, kv_idx, dout, caps, grad_caps) -> dscore fp32 [BLOCK_M, BLOCK_N]
    score_bias_fn(b, h, q_idx, kv_idx, caps) -> fp32 [BLOCK_M, BLOCK_N]   (additive score mods only)

``caps`` is a flat tuple holding, per captured tensor (slot order): the tensor, its sizes, its
strides; ``grad_caps`` holds, per captured tensor that gets a gradient, the buffer and its strides.
Sizes and strides travel encoded (``analysis.encode_int``: ``2 * v + 2**40 + 1``, always an odd
int64) because Triton specializes integers inside tuple arguments on ``== 1`` and on divisibility
by 16: encoded, new lengths never compile a kernel again. Index arithmetic is int32 unless a
captured tensor may span 2**31 elements (part of the cache key). Gathers wrap negative indices
Python-style and clamp into range, so no lane reads out of bounds.

Gradients of captures are summed over the tile axes their address does not vary along (a bias
indexed by ``h`` gets one atomic add per tile, one indexed by ``q_idx`` one per query), then added
with ``tl.atomic_add``; this works for either tile orientation (``q_idx`` [M, 1] or [1, M]), since
only shapes decide. When ``grad_caps`` is the empty tuple the atomics are compiled out, so a kernel
that only needs ``dscore`` (e.g. a dQ pass) passes ``()``. Buffers may be float32 or int64: an int64
buffer receives ``trunc(value)``, which with a scaled ``dout`` gives order-independent fixed-point
(deterministic) accumulation.
"""

from __future__ import annotations

from flexattn.compiler.analysis import M, N
from flexattn.compiler.ir import Graph
from flexattn.compiler.lowering import Emitter, unpack_capture

TILE_PARAMS = ", q_lo, kv_lo"  # the extra parameters of tile functions (after kv_idx)


def _broadcast_to_tile(em: Emitter, var: str, node: int, mask: bool) -> list[str]:
    """Lines broadcasting ``var`` to the full [BLOCK_M, BLOCK_N] tile where it lacks an axis."""
    dims = em.dims[node]
    if dims == {M, N}:
        return []
    if not mask:
        return [f"{var}, _ = tl.broadcast({var}, score)"]
    lines = []
    if M not in dims:
        lines.append(f"{var}, _ = tl.broadcast({var}, q_idx)")
    if N not in dims:
        lines.append(f"{var}, _ = tl.broadcast({var}, kv_idx)")
    return lines


def _function(name: str, params: str, doc: str, body: list[str]) -> str:
    lines = ["@triton.jit", f"def {name}({params}):", f'    """{doc}"""']
    lines += [f"    {line}" for line in body]
    return "\n".join(lines)


def forward_function(
    graph: Graph, output: int, kind: str, target: str, name: str, fast_math: bool = False, tile: bool = False
) -> str:
    """Source of the score or mask device function (``fast_math``, ``tile``: see ``Emitter``)."""
    em = Emitter(graph, target, output, fast_math, tile)
    em.emit(graph.live([output]))
    body = list(em.lines) + [f"out = {em.tensor(output)}"]
    body += _broadcast_to_tile(em, "out", output, mask=kind == "mask")
    body.append("return out")
    extra = TILE_PARAMS if tile else ""
    if kind == "score":
        return _function(name, f"score, b, h, q_idx, kv_idx{extra}, caps", "Score mod (generated).", body)
    return _function(name, f"b, h, q_idx, kv_idx{extra}, caps", "Mask mod (generated).", body)


def bias_function(
    graph: Graph, bias: int, target: str, name: str, fast_math: bool = False, tile: bool = False
) -> str:
    """Source of an additive score mod's base-2 bias ``(b, h, q_idx, kv_idx, caps) -> fp32`` tile
    (``compiler/additive.py``); ``caps`` as for the score function of the same graph."""
    em = Emitter(graph, target, bias, fast_math, tile)
    em.emit(graph.live([bias]))
    body = list(em.lines) + [f"out = {em.tensor(bias)}.to(tl.float32)"]
    body += _broadcast_to_tile(em, "out", bias, mask=True)
    body.append("return out")
    params = f"b, h, q_idx, kv_idx{TILE_PARAMS if tile else ''}, caps"
    return _function(name, params, "Additive score mod's bias times log2(e) (generated).", body)


def gradient_function(
    graph: Graph,
    output: int,
    dscore: int,
    grads: list[tuple[int, int]],
    target: str,
    name: str,
    fast_math: bool = False,
    tile: bool = False,
) -> str:
    """Source of the score mod's gradient function (``grads``: (load node, adjoint node) pairs)."""
    em = Emitter(graph, target, output, fast_math, tile)
    em.emit(graph.live([dscore]))
    body = list(em.lines)
    if grads:
        em.lines = []
        em.emit(graph.live([adjoint for _, adjoint in grads]))
        slots = sorted({graph.nodes[load].value for load, _ in grads})
        base = 0
        for slot in slots:
            ndim = graph.captures[slot].ndim
            strides = [f"g{slot}_s{d}" for d in range(ndim)]
            em.lines += unpack_capture("grad_caps", base, f"g{slot}", [], strides, em.layouts[slot].wide)
            base += 1 + ndim
        for load, adjoint in grads:
            em.lines += _accumulate(em, load, adjoint)
        body.append("if len(grad_caps) > 0:")
        body += [f"    {line}" for line in em.lines]
    body.append(f"dscore = {em.tensor(dscore)}")
    body += _broadcast_to_tile(em, "dscore", dscore, mask=False)
    body.append("return dscore")
    return _function(
        name,
        f"score, b, h, q_idx, kv_idx{TILE_PARAMS if tile else ''}, dout, caps, grad_caps",
        "Gradient of the score mod (generated): returns dLoss/dscore, accumulates capture gradients.",
        body,
    )


def _accumulate(em: Emitter, load: int, adjoint: int) -> list[str]:
    """Sum the adjoint over the tile axes the gathered address does not vary along, then atomic add
    (diagonal gathers in tile functions: per diagonal, one atomic per distinct entry)."""
    node = em.graph.nodes[load]
    slot, ndim = node.value, em.graph.captures[node.value].ndim
    var = f"d{load}"
    lines = [f"{var} = {em.tensor(adjoint)}"]
    if em.dims[adjoint] != {M, N}:
        lines.append(f"{var}, _ = tl.broadcast({var}, dout)")
    if load in em.diagonals:
        strides = [f"g{slot}_s{d}" for d in range(ndim)]
        diag = em.diagonals[load]
        em.lines, outer = lines, em.lines
        em.diagonal_branch(
            load,
            strides,
            lambda others, d0: [
                f"td.add_diagonals(g{slot} + {others}, {strides[diag.dim]}, {d0}, {var}, q_idx, kv_idx, {diag.sign})"
            ],
            lambda: em.lines.extend(_atomic_per_element(em, load, var)),
        )
        lines, em.lines = em.lines, outer
        return lines
    return lines + _atomic_per_element(em, load, var)


def _atomic_per_element(em: Emitter, load: int, var: str) -> list[str]:
    """Atomic adds of ``var`` at the load's gathered addresses, summed first over the tile axes
    the address does not vary along."""
    node = em.graph.nodes[load]
    slot, ndim = node.value, em.graph.captures[node.value].ndim
    offset = em.offset(load, [f"g{slot}_s{d}" for d in range(ndim)])
    ptr = f"p{load}"
    lines = [f"{ptr} = g{slot} + {offset}" if offset else f"{ptr} = g{slot}"]
    index_dims = frozenset().union(*[em.dims[a] for a in node.args]) if node.args else frozenset()
    if not index_dims:
        lines.append(f"{var} = tl.sum(tl.sum({var}, 1), 0)")
    elif index_dims != {M, N}:
        lines.append(f"{var} = tm.sum_to({var}, {ptr})")
    lines.append(f'tl.atomic_add({ptr}, {var}, sem="relaxed")')
    return lines


MODULE_HEADER = '''"""Generated by flexattn.compiler from mod {name!r} (target: {target}). Do not edit."""

import triton
import triton.language as tl
from triton.language.extra import libdevice  # noqa: F401

from flexattn.compiler import triton_diagonals as td  # noqa: F401
from flexattn.compiler import triton_math as tm  # noqa: F401
'''


def module_source(name: str, target: str, functions: list[str]) -> str:
    return MODULE_HEADER.format(name=name, target=target) + "\n\n" + "\n\n\n".join(functions) + "\n"
