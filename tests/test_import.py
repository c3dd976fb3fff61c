"""Importing flexattn is cheap: Triton, the mod compiler and the kernels load on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("triton", "torch._dynamo", "torch._inductor", "flexattn.compiler", "flexattn.kernels")


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules present in a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.parametrize(
    "code",
    [
        "import flexattn",
        "import flexattn.cli",
        "from flexattn import BlockMask, create_block_mask, create_mask, and_masks, or_masks",
        "from flexattn import KernelOptions, FlexKernelOptions",
        "from flexattn import variants",
    ],
)
def test_import_loads_no_triton_compiler_or_kernels(code):
    assert _loaded_after(code) == []


def test_public_names_resolve_lazily_to_their_definitions():
    import flexattn
    from flexattn import api, block_mask, options

    assert flexattn.flex_attention is api.flex_attention
    assert flexattn.BlockMask is block_mask.BlockMask
    assert flexattn.FlexKernelOptions is options.FlexKernelOptions
    assert set(flexattn.__all__) == set(flexattn._PUBLIC) and set(flexattn.__all__) <= set(dir(flexattn))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flexattn.nope  # noqa: B018


def test_cli_help_loads_not_even_torch():
    code = (
        "import sys\nfrom flexattn.cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['show', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: flexattn" in result.stdout
    assert result.stdout.split()[-1] == "False"
