"""A fix that lets Triton's interpreter (``TRITON_INTERPRET=1``, the CPU test path) run flexattn's kernels."""

from __future__ import annotations

import os


def _fix_interpreter_scalar_index() -> None:
    """Let Triton's interpreter use loaded scalars as loop bounds under NumPy >= 2.

    The interpreter (triton 3.6) holds scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy 2 rejects for 1-d arrays; every kernel whose loop count is read from
    memory (the block-sparse loops) would fail on CPU. Compiled GPU kernels are unaffected.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "flexattn_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.flexattn_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalar_index()
