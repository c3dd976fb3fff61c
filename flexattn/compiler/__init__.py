"""The mod compiler: score_mod / mask_mod -> Triton device functions (``KernelMod``).

    ir.py          the typed per-element IR (Graph, Node) and a torch evaluator for it
    proxy.py       proxies for the mod's values; typed op builders with PyTorch's semantics
    trace.py       the supported torch surface; run the mod on proxies -> IR (errors.py: refusals)
    composites.py  torch functions built from IR primitives (activations, lerp, ...); what is refused
    checks.py      the trace-time checks every backend runs before evaluating a mod (check_mod)
    index_ranges.py  gathers certainly out of range on a grid, from the shapes alone
    autodiff.py    reverse-mode gradient of a score mod, as more IR
    rewrite.py     value-preserving IR rewrites that make the kernels cheaper (run before codegen)
    analysis.py    tile axes, signs, exactness and argument layout of a graph
    lowering.py    IR node -> Triton expression (helpers in triton_math.py)
    codegen.py     the ``@triton.jit`` device functions (forward, mask, gradient)
    cache.py       structure key -> generated functions; the compile counter
    fingerprint.py a cheap key for a mod's traced meaning: repeat calls skip the trace
    kernel_mod_cache.py  compiled mods by fingerprint, holding only weak references
    intervals.py   interval analysis of a mask mod: decides block-mask tiles from index ranges
    range_tables.py      the min/max tables of captured tensors its gathers read
    interval_cache.py    the generated interval functions (interval_math.py: their helpers)

Example::

    from flexattn.compiler import compile_score_mod, explain

    bias = torch.randn(8, 2 * 1024 - 1, device="cuda", requires_grad=True)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + 1023]

    mod = compile_score_mod(rel_bias)   # KernelMod: fn, args, grad_fn, grad_captures, ...
    print(explain(rel_bias))            # IR and generated Triton source

Supported inside mods: Python operators (``+ - * / // % **``, comparisons, ``& | ^ ~ << >>``, unary
``-``, ``abs``) and every pointwise torch function a mod can call on 0-dim tensors (functions,
Tensor methods, ``torch.nn.functional`` and ``torch.special`` spellings): arithmetic, pow with tensor
or scalar exponents, rsqrt/reciprocal, remainder (Python) and fmod (C), floor division and
div(rounding_mode=...), floor/ceil/round(decimals=...)/trunc/frac, exp/exp2/expm1/log/log2/log10/
log1p, trig and hyperbolic functions and their inverses, atan2, hypot, erf/erfc/ndtr, sigmoid,
activations (gelu in both approximations, silu, softplus, mish, elu, selu, celu, relu, relu6,
leaky_relu, hardtanh, hardsigmoid, hardswish, logsigmoid, softsign, tanhshrink, threshold,
hardshrink, softshrink), where/masked_fill, clamp/clip, minimum/maximum and the NaN-ignoring
fmax/fmin, comparisons, logical and bit ops (shifts by any count, as torch defines them),
isnan/isinf/isfinite/isposinf/isneginf/isclose, nan_to_num, sign/sgn/signbit/copysign, lerp,
logaddexp, xlogy, casts, ``*_like``/``new_*`` constants and ``torch.tensor(number)`` (the full list:
``tests/compiler/test_surface.py``); ``fast_tanh``; gathers from captured tensors of any dtype and
rank (nested gathers, partial indexing), ``searchsorted``/``bucketize`` over a captured sorted 1-D
tensor, captured Python numbers and 0-dim tensors, nn.Module mods, and mods calling other mods.
Results have eager PyTorch's dtypes, and gradients follow PyTorch's derivative formulas. Everything
else raises ``ModCompileError`` naming the source line, with a hint; the pointwise functions still
refused, and why, are in ``composites.REFUSED`` and docs/debugging.md.

Caching: code is generated once per structure. Captured tensors are runtime arguments (new values
or sizes reuse the code and the compiled kernels); Python numbers in the mod are constants of the
code, as in PyTorch, so a number that changes every call (``L - 1`` for a new length) generates
code per value: capture it as a 0-dim tensor (``torch.tensor(L - 1)``) to make it a runtime value.

Numerics: values that decide a mask bit, an index or an integer are computed as eager PyTorch does
on the target device (IEEE division, libdevice math; division by a Python number as ``x * (1/c)``
on GPUs, like eager CUDA); smooth score arithmetic uses the fast forms. Gradients are float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os

import torch

from flexattn.compiler import cache, checks, interval_cache
from flexattn.compiler.additive import additive_term, base2_bias
from flexattn.compiler.analysis import M, N, tile_dims
from flexattn.compiler.autodiff import differentiate
from flexattn.compiler.binding import bind_captures
from flexattn.compiler.cache import codegen_count
from flexattn.compiler.checks import check_mod
from flexattn.compiler.codegen import bias_function, forward_function, gradient_function, module_source
from flexattn.compiler.diagonals import diagonal_loads
from flexattn.compiler.errors import ModCompileError, ModIndexError
from flexattn.compiler.fingerprint import Fingerprint, fingerprint_of
from flexattn.compiler.fingerprint import fingerprint as fingerprint_now
from flexattn.compiler.ir import capture_spec
from flexattn.compiler.kernel_mod_cache import KernelModCache
from flexattn.compiler.proxy import fast_tanh
from flexattn.compiler.range_tables import range_args
from flexattn.compiler.rewrite import hoist_index_casts
from flexattn.compiler.trace import Program, trace
from flexattn.kernels.block_mask_kernel import BlockMaskMod
from flexattn.kernels.mods import KernelMod

__all__ = [
    "ModCompileError",
    "ModIndexError",
    "bind_captures",
    "check_mod",
    "clear_cache",
    "codegen_count",
    "compile_block_mask_mod",
    "compile_mask_mod",
    "compile_mods",
    "compile_score_mod",
    "explain",
    "fast_tanh",
    "trace_score_mod",
]


# Compiled mods by fingerprint. A training step calls each mod in every layer, so repeat calls are
# the common case; the bound keeps closures made per call from piling up.
_KERNEL_MODS = KernelModCache(size=256)


def clear_cache() -> None:
    """Forget every compiled mod and its generated code (the next compile of each traces and
    generates code again)."""
    _KERNEL_MODS.clear()
    cache.clear()
    checks.clear()
    interval_cache.clear()


def _identity(score, b, h, q_idx, kv_idx):
    return score


def _always(b, h, q_idx, kv_idx):
    return True


def compile_score_mod(
    score_mod,
    *,
    device=None,
    fast_math: bool = False,
    target: str | None = None,
    fingerprint: Fingerprint | None = None,
) -> KernelMod:
    """Compile ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (None: identity) to a KernelMod.

    ``device`` (optional) is where the kernels run: it picks the code target (Triton's interpreter
    on CPU, CUDA/HIP on GPUs) and must hold every captured tensor. Without it the target is the
    interpreter when ``TRITON_INTERPRET=1`` or no GPU is present. Captured tensors that require
    grad and reach the output differentiably are ``grad_captures``; ``make_grad_args`` takes one
    float32 buffer per entry (same shape) and the generated ``grad_fn`` atomically adds into them.
    ``fast_math``: ``torch.tanh`` outside values that decide a mask bit or an index becomes the
    hardware ``tanh.approx.f32`` on NVIDIA GPUs (relative error 2**-11: for fp16/bf16 attention,
    where it is below the rounding of the scores to the input dtype; docs/kernel_options.md).
    ``target`` ("interpreter", "cuda" or "hip") overrides the code target the device implies (tools
    that compile for a GPU they do not have: ``benchmarks/compile_report.py``). ``fingerprint``: the
    mod's ``fingerprint.fingerprint``, if the caller computed it this call (its checks did).
    """
    if score_mod is None:
        score_mod, fingerprint = _identity, _builtin_fingerprint(_identity)
    return _compile(score_mod, "score", device, fast_math, target, fingerprint)


def trace_score_mod(score_mod, device=None) -> Program:
    """The traced and rewritten graph of ``score_mod`` (what codegen sees; no code is generated)."""
    return _program(score_mod, "score", device)


def compile_mask_mod(
    mask_mod, *, device=None, target: str | None = None, fingerprint: Fingerprint | None = None
) -> KernelMod:
    """Compile ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (None: always true) to a KernelMod
    (``device``, ``target`` and ``fingerprint`` as in :func:`compile_score_mod`)."""
    if mask_mod is None:
        mask_mod, fingerprint = _always, _builtin_fingerprint(_always)
    return _compile(mask_mod, "mask", device, target=target, fingerprint=fingerprint)


def compile_mods(
    score_mod, mask_mod, *, device=None, fast_math: bool = False, fingerprints=None
) -> tuple[KernelMod, KernelMod]:
    """:func:`compile_score_mod` and :func:`compile_mask_mod` of one attention call, reading the
    environment (``TRITON_INTERPRET``) once for both. ``fingerprints``: the call's
    ``fingerprint.CallFingerprints``, or None."""
    score_fp = None if fingerprints is None else fingerprints.score
    mask_fp = None if fingerprints is None else fingerprints.mask
    if score_mod is None:
        score_mod, score_fp = _identity, _builtin_fingerprint(_identity)
    if mask_mod is None:
        mask_mod, mask_fp = _always, _builtin_fingerprint(_always)
    interpreted = _interpreted()
    score = _compile(score_mod, "score", device, fast_math, fingerprint=score_fp, interpreted=interpreted)
    mask = _compile(mask_mod, "mask", device, fingerprint=mask_fp, interpreted=interpreted)
    return score, mask


_BUILTIN_FINGERPRINTS: dict[tuple, Fingerprint] = {}


def _builtin_fingerprint(mod) -> Fingerprint:
    """The fingerprint of ``_identity`` / ``_always`` (no closure, defaults or user globals: their
    key changes only with torch's default dtype), computed once per default dtype."""
    key = (mod, torch.get_default_dtype())
    found = _BUILTIN_FINGERPRINTS.get(key)
    if found is None:
        found = _BUILTIN_FINGERPRINTS[key] = fingerprint_now(mod)
    return found


def compile_block_mask_mod(
    mask_mod, *, device=None, grain: int = 64, target: str | None = None
) -> BlockMaskMod:
    """Compile ``mask_mod`` for building block masks on ``device`` (``create_block_mask``'s kernel).

    Returns the element-wise mask (``compile_mask_mod``), its interval function
    (``compiler.intervals``) and the min/max tables of its captured tensors, built now on their
    device over grains of ``grain`` positions. Repeat calls with an unchanged mod skip the trace;
    new captured values only rebuild the tables. ``target`` as for :func:`compile_score_mod`.
    """
    mod = mask_mod if mask_mod is not None else _always
    mask = compile_mask_mod(mod, device=device, target=target)
    entry = interval_cache.for_mask_fn(mask.fn)
    if entry is None:
        program = _program(mod, "mask", device)
        entry = interval_cache.interval_entry(program, target or _target(device, program))
        interval_cache.remember(mask.fn, entry)
    return BlockMaskMod(mask, entry.fn, range_args(entry.plan, list(mask.captures), grain), mask.name)


def explain(mod, kind: str | None = None, *, device=None, fast_math: bool = False) -> str:
    """The IR and the generated Triton source of a mod, for debugging.

    ``kind`` is "score" or "mask"; by default a mod with 5 parameters is a score mod. For a mask mod
    it also shows how ``create_block_mask`` builds masks on the GPU: the interval function that
    decides tiles from their index ranges, and what it leaves to element-wise evaluation.
    ``fast_math`` as for :func:`compile_score_mod`.
    """
    kind = kind or _guess_kind(mod)
    program = _program(mod, kind, device)
    target = _target(device, program)
    entry = _entry(program, target, fast_math)
    text = (
        f"# mod {program.name!r} ({kind} mod), generated file {entry.path}\n"
        f"# IR\n{program.graph.format([program.output])}\n\n# Triton source\n{entry.source}"
    )
    if kind == "mask":
        intervals = interval_cache.interval_entry(program, target)
        unknown = ", ".join(intervals.plan.unknown_ops) or "nothing"
        text += (
            "\n# create_block_mask on the GPU: the generated kernel (compiler/intervals.py decides tiles "
            f"from index ranges; unknown to it: {unknown}; undecided tiles are evaluated element-wise)\n"
            f"# interval function, generated file {intervals.path}\n{intervals.source}"
        )
    return text


def _program(mod, kind: str, device) -> Program:
    """The traced and rewritten mod: the graph the cache key, ``explain`` and codegen all see."""
    program = trace(mod, kind, device)
    graph, (output,) = hoist_index_casts(program.graph, [program.output])
    return dataclasses.replace(program, graph=graph, output=output)


def _guess_kind(mod) -> str:
    try:
        params = inspect.signature(mod).parameters
    except (TypeError, ValueError):
        return "score"
    return "score" if len(params) >= 5 else "mask"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _target(device, program: Program) -> str:
    if device is None:
        devices = {t.device for t in program.graph.captures}
        device = next(iter(devices)) if len(devices) == 1 else None
    if device is not None:
        device = torch.device(device)
        for tensor in program.graph.captures:
            if not _same_device(tensor.device, device):
                raise ModCompileError(
                    f"{program.name}: a captured tensor of shape {tuple(tensor.shape)} is on {tensor.device} "
                    f"but the kernels run on {device}\n  hint: move it with .to({str(device)!r})"
                )
    if _interpreted() or (device is not None and device.type == "cpu") or not torch.cuda.is_available():
        return "interpreter"
    return "hip" if torch.version.hip else "cuda"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _entry(program: Program, target: str, fast_math: bool = False) -> cache.CompiledMod:
    graph, output = program.graph, program.output
    differentiable = program.kind == "score"
    fast_math = fast_math and program.kind == "score" and target == "cuda"
    key = (program.kind, target, fast_math, graph.structure_key([output], differentiable))
    entry = cache.lookup(key)
    if entry is None:
        entry = cache.store(key, lambda: _generate(program, target, fast_math))
    return entry


def _generate(program: Program, target: str, fast_math: bool) -> cache.CompiledMod:
    graph, output = program.graph, program.output
    suffix = hashlib.sha256(repr(graph.structure_key([output], True)).encode()).hexdigest()[:8]
    name = f"{program.kind}_mod_{suffix}"
    functions = [forward_function(graph, output, program.kind, target, name, fast_math)]
    grad_name, tile_grad_name, grad_slots = None, None, ()
    if program.kind == "score":
        slots = {s for s, t in enumerate(graph.captures) if capture_spec(t, True).requires_grad}
        gradient = differentiate(graph, output, slots)
        grad_slots = tuple(sorted({graph.nodes[load].value for load, _ in gradient.captures}))
        grad_name = f"{name}_grad"
        grads = list(gradient.captures)
        functions.append(
            gradient_function(graph, output, gradient.dscore, grads, target, grad_name, fast_math)
        )
        if diagonal_loads(graph, [load for load, _ in grads]):  # per-diagonal gradient sums (diagonals.py)
            tile_grad_name = f"{name}_grad_tile"
            functions.append(
                gradient_function(
                    graph, output, gradient.dscore, grads, target, tile_grad_name, fast_math, True
                )
            )
    bias_name = None
    term = additive_term(graph, output) if program.kind == "score" else None
    if term is not None:
        with_bias = graph.copy()  # the same capture slots, so the bias reads the score mod's caps
        bias_name = f"{name}_bias"
        functions.append(bias_function(with_bias, base2_bias(with_bias, term), target, bias_name, fast_math))
    source = module_source(program.name, target, functions)
    module, path = cache.load_module(source)
    fns = [getattr(module, n) if n else None for n in (grad_name, bias_name, tile_grad_name)]
    return cache.CompiledMod(getattr(module, name), fns[0], grad_slots, source, path, fns[1], fns[2])


def _compile(
    mod,
    kind: str,
    device,
    fast_math: bool = False,
    target: str | None = None,
    fingerprint=None,
    interpreted: bool | None = None,
) -> KernelMod:
    """The KernelMod of ``mod``; repeat calls with an unchanged mod skip the trace (fingerprint.py).
    ``interpreted``: ``_interpreted()``, if the caller read it this call."""
    fingerprint = fingerprint_of(mod, fingerprint)
    key, keep = _cache_key(fingerprint, kind, device, fast_math, target, interpreted), fingerprint.keep
    if key is not None:
        kernel_mod = _KERNEL_MODS.get(key)
        if kernel_mod is not None:
            return kernel_mod
    program = _program(mod, kind, device)
    kernel_mod = _kernel_mod(program, device, fast_math, target)
    # A trace that read a tensor's values (float(t), t.exp()) holds them: writes through .data or
    # numpy keep the version counter, and a tensor it made carries one call's autograd history.
    if key is not None and not program.read_tensor_values:
        _KERNEL_MODS.put(key, kernel_mod, keep)
    return kernel_mod


def _cache_key(fingerprint: Fingerprint, kind: str, device, fast_math, target, interpreted) -> tuple | None:
    """The fingerprint cache's key for a compile of ``kind`` on ``device`` (None: not cacheable)."""
    if fingerprint.key is None:
        return None
    where = device if device is None or isinstance(device, torch.device) else torch.device(device)
    interpreted = _interpreted() if interpreted is None else interpreted
    return (kind, where, interpreted, fast_math, target, fingerprint.key)  # (a device hashes as it is)


def is_remembered(fingerprint: Fingerprint, kind: str, *, device=None, fast_math: bool = False) -> bool:
    """Whether compiling the mod of ``fingerprint`` (``kind`` "score" or "mask") for ``device`` again
    returns the compiled mod without a trace: it was compiled, and its trace read no tensor values
    (such a trace is never remembered, see :func:`_compile`). ``fast_math`` as for
    :func:`compile_score_mod`."""
    key = _cache_key(fingerprint, kind, device, fast_math, None, None)
    return key is not None and key in _KERNEL_MODS


def _kernel_mod(program: Program, device, fast_math: bool = False, target: str | None = None) -> KernelMod:
    entry = _entry(program, target or _target(device, program), fast_math)
    template = KernelMod(
        fn=entry.fn,
        args=(),
        grad_fn=entry.grad_fn,
        bias_fn=entry.bias_fn,
        name=program.name,
        trivial=_is_trivial(program),
        light=_is_light(program, entry.grad_slots),
        tile_gathers=_gathers_per_score(program),
        grad_slots=entry.grad_slots if program.kind == "score" else (),
        tile_grad_fn=entry.tile_grad_fn,
    )
    return bind_captures(template, tuple(program.graph.captures), check=False)


def _gathers_per_score(program: Program) -> bool:
    """Whether the mod loads a captured tensor at an index varying along both tile axes."""
    dims = tile_dims(program.graph)
    live = program.graph.live([program.output])
    return any(program.graph.nodes[i].op == "load" and dims[i] == {M, N} for i in live)


def _is_trivial(program: Program) -> bool:
    """A score mod that returns its score unchanged, or a mask mod that is the constant True."""
    out = program.graph.nodes[program.output]
    if program.kind == "score":
        return out.op == "score"
    return out.op == "const" and out.value is True


# Operations that cost a special-function or multi-instruction sequence per element (and registers for
# their gradients): a score mod using none of them is "light".
_HEAVY_OPS = frozenset(
    {"exp", "exp2", "log", "log2", "log1p", "expm1", "tanh", "fast_tanh", "sigmoid", "sqrt", "rsqrt", "sin",
     "cos", "erf", "pow", "truediv", "floordiv", "mod"}
)  # fmt: skip
_LIGHT_MAX_NODES = 24


def _is_light(program: Program, grad_slots: tuple) -> bool:
    """A score mod of a few cheap element-wise operations and no learnable captures (ALiBi, relative
    position offsets): its gradient needs few registers, so launchers may cap them (BENCHMARKS.md)."""
    if program.kind != "score" or grad_slots:
        return False
    live = program.graph.live([program.output])
    return len(live) <= _LIGHT_MAX_NODES and not any(program.graph.nodes[i].op in _HEAVY_OPS for i in live)
