"""Evaluate user mods with PyTorch's per-element semantics over grids of indices.

A mod is written for 0-dim tensors: ``score_mod(score, b, h, q_idx, kv_idx)`` or
``mask_mod(b, h, q_idx, kv_idx)``. As in ``torch.nn.attention.flex_attention``, we lift it to whole
grids with four nested ``torch.vmap`` levels (over b, h, q_idx, kv_idx), so a mod that gathers a row
and indexes into it (``iv = intervals[img[kv_idx]]; iv[0]``) means the same thing here as in a kernel.
vmap's batching rules keep the cost close to plain broadcasting.

Used by the block-mask builder and the reference backend; imports nothing from flexattn.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

# vmap levels from the innermost (kv_idx) to the outermost (b).
_LEVELS = ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None))


def required_positional_args(fn: Callable) -> int:
    """Number of positional parameters of ``fn`` that have no default (PyTorch's rule for mods)."""
    code = getattr(fn, "__code__", None)
    if code is not None and not inspect.ismethod(fn):
        return code.co_argcount - len(getattr(fn, "__defaults__", None) or ())
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def check_mod(fn: Callable, argument: str, kind: str) -> None:
    """Raise a clear error unless ``fn`` is a callable mod of the given kind.

    ``kind`` is "score_mod" (5 positional arguments) or "mask_mod" (4); ``argument`` names the
    user-facing argument in the message.
    """
    if not callable(fn):
        raise TypeError(f"{argument} must be callable, got {type(fn).__name__}: {fn!r}.")
    want = 5 if kind == "score_mod" else 4
    signature = "(score, b, h, q_idx, kv_idx)" if kind == "score_mod" else "(b, h, q_idx, kv_idx)"
    try:
        got = required_positional_args(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself decide
    if got != want:
        hint = ""
        if kind == "mask_mod" and got == 5:
            hint = " It looks like a score_mod: pass it as score_mod= instead."
        elif kind == "score_mod" and got == 4:
            hint = " It looks like a mask_mod: build a mask with create_block_mask(...) and pass block_mask=."
        raise TypeError(
            f"{argument} must take {want} positional arguments {signature}, but "
            f"{getattr(fn, '__name__', fn)!r} takes {got}.{hint}"
        )


def _as_tensor_result(fn: Callable) -> Callable:
    """Wrap ``fn`` so that a Python number result becomes a tensor (vmap needs tensors)."""

    def wrapped(*args):
        result = fn(*args)
        if not isinstance(result, torch.Tensor):
            result = torch.as_tensor(result, device=args[-1].device)
        return result

    return wrapped


# Set by flexattn.compiler.checks (this module imports nothing from flexattn): whether a mod the
# compiler traced evaluates differently on broadcast index grids than under vmap (a trace-time
# constant under torch.compile: flexattn.custom_ops marks it).
_NEEDS_VMAP: Callable[[Callable], bool] | None = None


def set_vmap_check(check: Callable[[Callable], bool]) -> None:
    """Install ``check(mod) -> bool``: True for a mod that ``vmap_mod`` must keep on vmap while
    torch.compile traces (``flexattn.compiler.checks.needs_vmap``)."""
    global _NEEDS_VMAP
    _NEEDS_VMAP = check


def vmap_mod(fn: Callable, has_score: bool, mod: Callable | None = None) -> Callable:
    """Lift a per-element mod to grids.

    The returned function takes ``(score, b, h, q_idx, kv_idx)`` (score mods) or
    ``(b, h, q_idx, kv_idx)`` (mask mods) where ``b, h, q_idx, kv_idx`` are 1-D int32 tensors of
    sizes (B, H, M, N) and ``score`` is (B, H, M, N); it returns a (B, H, M, N) tensor.

    ``mod``: the user's mod ``fn`` evaluates (default ``fn``). While torch.compile traces, a mod
    that indexes no gathered row is called once on broadcast grids instead (``_broadcast_mod``).

    Example:
        >>> grid = vmap_mod(lambda b, h, q, kv: q >= kv, has_score=False)
        >>> ar = lambda n: torch.arange(n, dtype=torch.int32)
        >>> grid(ar(1), ar(1), ar(3), ar(3)).shape
        torch.Size([1, 1, 3, 3])
    """
    if torch.compiler.is_compiling() and (_NEEDS_VMAP is None or not _NEEDS_VMAP(fn if mod is None else mod)):
        return _broadcast_mod(fn, has_score)
    lifted = _as_tensor_result(fn)
    prefix = (0,) if has_score else ()
    for dims in _LEVELS:
        lifted = torch.vmap(lifted, in_dims=prefix + dims, out_dims=0)
    return lifted


def _broadcast_mod(fn: Callable, has_score: bool) -> Callable:
    """``vmap_mod`` while torch.compile traces: the mod called once on index grids that broadcast
    to (B, H, M, N). vmap over a graph with symbolic sizes fails in Dynamo's fake-tensor mode (a
    SymInt added to a batched tensor, e.g. transformers' mask offsets once a length is dynamic);
    every mod reaching a traced call passed the compiler's trace-time check, which accepts only
    pointwise expressions and gathers, and those give the same values broadcast as vmapped, except
    a gathered row indexed again (``table[h][q_idx]``: the second index would hit the first's grid
    dimension), which ``vmap_mod`` keeps on vmap (``set_vmap_check``)."""
    lifted = _as_tensor_result(fn)

    def on_grids(*args: torch.Tensor) -> torch.Tensor:
        *score, b, h, q, kv = args
        return lifted(*score, *broadcast_grids(b, h, q, kv))

    return on_grids


def broadcast_grids(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> tuple:
    """1-D index tensors as views that broadcast to (B, H, M, N): (B,1,1,1), (1,H,1,1), (1,1,M,1), (1,1,1,N)."""
    return b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1)


def index(start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    """int32 positions ``start .. stop-1`` (the index dtype every mod receives)."""
    return torch.arange(start, stop, dtype=torch.int32, device=device)


def eval_mask_mod(
    mask_mod: Callable, b: int | torch.Tensor, h: int | torch.Tensor, q: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    """mask_mod over the given b, h, q and kv positions -> bool (nb, nh, M, N).

    ``b`` / ``h`` are 1-D int32 index tensors, or ints B / H meaning ``range(B)`` / ``range(H)``.
    """
    device = q.device
    b = index(0, b, device) if isinstance(b, int) else b
    h = index(0, h, device) if isinstance(h, int) else h
    out = _run(mask_mod, vmap_mod(mask_mod, has_score=False), b, h, q, kv)
    if out.dtype != torch.bool:
        raise TypeError(
            f"mask_mod {getattr(mask_mod, '__name__', mask_mod)!r} must return a bool tensor, got "
            f"{out.dtype}. Return a comparison (e.g. `q_idx >= kv_idx`) or add `.bool()` / `!= 0`."
        )
    return out.expand(b.numel(), h.numel(), q.numel(), kv.numel())


def eval_score_mod(
    score_mod: Callable, score: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    """score_mod over a (B, H, M, N) score grid at the given q/kv positions -> (B, H, M, N)."""
    B, H = score.shape[:2]
    device = score.device
    lifted = vmap_mod(score_mod, has_score=True)
    out = _run(score_mod, lifted, score, index(0, B, device), index(0, H, device), q, kv)
    return out.expand(score.shape)


def eval_bias(
    score_mod: Callable, b: int | torch.Tensor, h: int | torch.Tensor, q: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    """``score_mod`` at score 0 over the given b, h, q and kv positions -> (nb, nh, M, N).

    For an additive score_mod (``score + f(b, h, q_idx, kv_idx)``) this is ``f`` exactly. The score
    is not batched, so dimensions ``f`` does not depend on come back broadcast (stride 0).
    """
    device = q.device
    b = index(0, b, device) if isinstance(b, int) else b
    h = index(0, h, device) if isinstance(h, int) else h
    zero = torch.zeros((), dtype=torch.float32, device=device)

    def at_zero(b_, h_, q_, kv_):
        return score_mod(zero, b_, h_, q_, kv_)

    out = _run(score_mod, vmap_mod(at_zero, has_score=False, mod=score_mod), b, h, q, kv)
    return out.expand(b.numel(), h.numel(), q.numel(), kv.numel())


def _run(mod: Callable, lifted: Callable, *grids: torch.Tensor) -> torch.Tensor:
    """``lifted(*grids)``, with eager's out-of-range IndexError said in the mod's terms."""
    try:
        return lifted(*grids)
    except IndexError as e:
        raise IndexError(
            f"{getattr(mod, '__name__', type(mod).__name__)}: a gather in the mod reads out of range at "
            f"some (b, h, q_idx, kv_idx) ({e}).\n  hint: mods are evaluated at every (b, h, q_idx, kv_idx) "
            "of the grid, masked pairs included: clamp the index or size the tensor for the whole grid "
            "(the Triton kernels clamp such an index; TRITON_DEBUG=1 makes them assert instead)"
        ) from e


def grad_captures(score_mod: Callable | None, device: torch.device) -> list[torch.Tensor]:
    """Captured tensors of ``score_mod`` that require grad (the autograd Functions' extra inputs);
    raises if the mod's result requires grad through a tensor this search cannot find."""
    if score_mod is None:
        return []
    captures = captured_grad_tensors(score_mod)
    if not captures:
        zero, first = torch.zeros(1, 1, 1, 1, device=device), index(0, 1, device)
        if eval_score_mod(score_mod, zero, first, first).requires_grad:
            raise RuntimeError(
                f"score_mod {getattr(score_mod, '__name__', score_mod)!r} uses a tensor that requires grad "
                "but flexattn could not find it among the mod's closure variables, defaults, globals or "
                "module attributes. Capture it directly (e.g. as a closure variable or default argument)."
            )
    return captures


def captured_grad_tensors(fn: Callable) -> list[torch.Tensor]:
    """Tensors requiring grad that ``fn`` can reach: closures, defaults, globals it names,
    functools.partial arguments, bound nn.Modules, and containers of these (searched recursively).

    The reference backend passes them to its recompute-in-backward autograd Function so gradients
    reach them. (The mod compiler finds captured tensors by tracing instead.)
    """
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    todo: list[object] = [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad:
                found[id(obj)] = obj
        elif isinstance(obj, torch.nn.Module):
            todo.extend(obj.parameters())
            todo.extend(obj.buffers())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, functools.partial):
            todo.extend((obj.func, obj.args, obj.keywords))
        elif inspect.ismethod(obj):
            todo.extend((obj.__func__, obj.__self__))
        elif inspect.isfunction(obj):
            todo.extend(cell.cell_contents for cell in obj.__closure__ or () if _filled(cell))
            todo.extend((obj.__defaults__ or (), obj.__kwdefaults__ or {}))
            names = _global_names(obj.__code__)
            todo.extend(obj.__globals__[name] for name in names if name in obj.__globals__)
        elif callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.append(vars(obj))  # callable objects keep their captures as attributes
    return list(found.values())


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _global_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _global_names(const)
    return names
