"""flexattn's compiled mods, as the Gluon kernels call them.

The mod compiler generates ``@triton.jit`` device functions (``flexattn/kernels/mods.py``); a Gluon
kernel calls them as they are, and Gluon compiles them with its own semantics. One spelling differs:
a constant is ``tl.full((), value, dtype)``, and Gluon's ``full`` takes a layout (``gl.full`` makes
a scalar without one). :func:`gluon_mod` gives the Gluon kernels a copy of a generated function whose
``tl`` (and the ``tm`` helpers') resolve ``full`` to ``gl.full``: the same code, so the Triton path
and the generated sources are unchanged.
"""

from __future__ import annotations

import types

import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.runtime.jit import JITFunction

from flexattn.kernels.mods import KernelMod


def _gluon_language() -> types.ModuleType:
    """``triton.language`` with Gluon's ``full`` (a module: Triton resolves module attributes in jit code)."""
    module = types.ModuleType("flexattn_gluon_tl", "triton.language with gl.full (gluon_mods)")
    module.__dict__.update({name: getattr(tl, name) for name in tl.__all__})
    module.full = gl.full
    return module


_TL = _gluon_language()
_COPIES: dict[JITFunction, JITFunction] = {}


def _copy(fn: JITFunction, replacements: dict) -> JITFunction:
    """``fn`` re-made over its own code with some of its globals replaced (remembered per function)."""
    copy = _COPIES.get(fn)
    if copy is None:
        py = fn.fn
        scope = dict(py.__globals__)
        scope.update({name: value for name, value in replacements.items() if name in scope})
        clone = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
        clone.__qualname__, clone.__module__, clone.__doc__ = py.__qualname__, py.__module__, py.__doc__
        copy = _COPIES[fn] = triton.jit(clone)
    return copy


_MATH: dict[types.ModuleType, types.ModuleType] = {}


def _gluon_math(math: types.ModuleType) -> types.ModuleType:
    """The generated code's helper module (``flexattn.compiler.triton_math``, reached through the
    function's own globals) with its jit helpers re-made over the Gluon ``tl``."""
    if math not in _MATH:
        module = types.ModuleType(f"{math.__name__}_gluon", f"{math.__name__} over gl.full (gluon_mods)")
        for name, value in vars(math).items():
            module.__dict__[name] = _copy(value, {"tl": _TL}) if isinstance(value, JITFunction) else value
        _MATH[math] = module
    return _MATH[math]


def gluon_fn(fn):
    """The Gluon kernels' copy of a generated ``@triton.jit`` mod function (None stays None)."""
    if fn is None:
        return None
    math = fn.fn.__globals__.get("tm")
    replacements = {"tl": _TL} if math is None else {"tl": _TL, "tm": _gluon_math(math)}
    return _copy(fn, replacements)


def gluon_mod(mod: KernelMod) -> tuple:
    """``(fn, args)`` of a compiled mod for a Gluon kernel."""
    return gluon_fn(mod.fn), mod.args
