"""Importing flexattn is cheap: Triton, the mod compiler and the kernels load on first use."""

from __future__ import annotations

import os
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
        "from flexattn import flex_attention",
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


def test_a_fresh_process_compiles_flex_attention_in_one_graph():
    """The checks of a call are a trace-time constant although ``import flexattn`` loads no Dynamo:
    api imports custom_ops (which marks them) before Dynamo reaches the call, in a fresh process too."""
    code = (
        "import torch\nfrom flexattn import flex_attention\n"
        "q = torch.randn(1, 2, 32, 16)\n"
        "f = torch.compile(flex_attention, fullgraph=True, backend='aot_eager')\n"
        "mod = lambda s, b, h, i, j: s - 0.1 * (i - j).abs()\n"
        "out = f(q, q, q, mod, kernel_options={'BACKEND': 'TRITON'})\n"
        "want = flex_attention(q, q, q, mod)\n"
        "print(float((out - want).abs().max()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 1e-5
