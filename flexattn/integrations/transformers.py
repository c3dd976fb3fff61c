"""Hugging Face transformers: run its ``attn_implementation="flex_attention"`` path on flexattn.

transformers builds its masks (causal, sliding window, padding, packed sequences) as mask_mods and
calls ``create_block_mask`` and ``flex_attention`` by the names its flex integration imports from
PyTorch; :func:`use_flexattn` rebinds those names to flexattn's, so every model that supports flex
attention runs on flexattn's kernels with no other change::

    import flexattn.integrations.transformers as hf
    hf.use_flexattn()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flex_attention")

:func:`use_pytorch` binds PyTorch's functions again (to compare the two in one process).

transformers wraps ``flex_attention`` in ``torch.compile``; the compiled graph re-reads each
call's mask closures (issue #18: docs/architecture.md, "Autograd and torch.compile").
"""

from __future__ import annotations

import importlib

import flexattn

_MODULES = ("transformers.integrations.flex_attention", "transformers.masking_utils")
_NAMES = {
    "flex_attention": flexattn.flex_attention,
    "create_block_mask": flexattn.create_block_mask,
    "BlockMask": flexattn.BlockMask,
    "AuxRequest": flexattn.AuxRequest,
}


_ORIGINALS: dict[tuple[str, str], object] = {}  # (module, name) -> transformers' own binding


def use_flexattn() -> None:
    """Rebind transformers' flex-attention names to flexattn's (idempotent).

    Raises ImportError naming the package when transformers is not installed.
    """
    modules = _modules()
    for module in modules:
        for name, value in _NAMES.items():
            if hasattr(module, name):
                _ORIGINALS.setdefault((module.__name__, name), getattr(module, name))
                setattr(module, name, value)
    _recompile_on_next_use(modules[0])


def use_pytorch() -> None:
    """Undo :func:`use_flexattn`: transformers' names are PyTorch's again (idempotent)."""
    modules = {module.__name__: module for module in _modules()}
    for (module_name, name), value in _ORIGINALS.items():
        setattr(modules[module_name], name, value)
    _recompile_on_next_use(modules[_MODULES[0]])


def _modules() -> list:
    try:
        modules = [importlib.import_module(name) for name in _MODULES]
    except ImportError as error:
        raise ImportError(
            f"flexattn.integrations.transformers needs Hugging Face transformers ({error}); "
            "install it with `pip install transformers`."
        ) from error
    return modules


def _recompile_on_next_use(flex_module) -> None:
    wrapper = getattr(flex_module, "WrappedFlexAttention", None)
    if wrapper is not None:  # its singleton compiled the old function: compile the new one on next use
        wrapper._instance = None
        wrapper._is_flex_compiled = False
