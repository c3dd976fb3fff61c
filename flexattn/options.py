"""KernelOptions: the one validated, documented set of knobs for flexattn's kernels.

Users pass a plain dict as ``kernel_options=`` (the same keys as ``torch.nn.attention.flex_attention``
where a key means the same thing); :func:`KernelOptions.from_user` validates it once at the API
boundary and everything below works with the frozen dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import torch

BACKENDS = ("AUTO", "TRITON", "REFERENCE", "CPU")
PREFILL_KERNELS = ("TRITON", "GLUON", "AUTO")  # the prefill forward (kernels/hopper/choice.py)
BACKWARD_KERNELS = ("TRITON", "GLUON")  # the backward (kernels/backward.py, kernels/hopper/backward_ws.py)
DECODE_MERGES = ("KERNEL", "FUSED")  # how the decode kernel's splits are merged (kernels/decode.py)

# Fields only the GPU kernels (Triton, Gluon; Triton's interpreter too) read: the CPU and reference
# backends warn when they are set (KernelOptions.kernel_only_changes, KernelOptionsWarning). The
# others (BACKEND, fast_math, deterministic, ROWS_GUARANTEED_SAFE) mean the same on every backend.
KERNEL_ONLY = (
    "PREFILL_KERNEL", "BACKWARD_KERNEL", "DECODE_MERGE", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages",
    "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_warps", "bwd_num_stages",
    "USE_TMA", "autotune",
)  # fmt: skip


class KernelOptionsWarning(UserWarning):
    """A call set kernel options that the backend it runs does not read (GPU-kernel knobs on a CPU or
    reference call): they do nothing there. ``warnings.filterwarnings("error", category=...)`` makes
    it an error; "ignore" silences it."""


# PyTorch spellings that mean the same knob as one of our fields.
_ALIASES = {
    "fwd_BLOCK_M": "BLOCK_M",
    "fwd_BLOCK_N": "BLOCK_N",
    "fwd_num_warps": "num_warps",
    "fwd_num_stages": "num_stages",
    "BLOCK_M1": "bwd_BLOCK_M1",
    "BLOCK_N1": "bwd_BLOCK_N1",
    "BLOCK_M2": "bwd_BLOCK_M2",
    "BLOCK_N2": "bwd_BLOCK_N2",
}

# PyTorch keys accepted for drop-in compatibility that need no action here, with the reason.
_ACCEPTED_NO_OPS = {
    "OUTPUT_LOGSUMEXP": "flexattn always writes the logsumexp (the backward pass needs it)",
    "FORCE_USE_FLEX_ATTENTION": "flexattn has no dense fallback kernel to avoid",
    "BLOCKS_ARE_CONTIGUOUS": "a hint only; flexattn reads the block indices either way",
    "WRITE_DQ": "flexattn always computes dQ when query requires grad",
    "PRESCALE_QK": "identity score mods already fold the scale into the exp2 multiplier; other mods "
    "need the scaled score itself",
}


class FlexKernelOptions(TypedDict, total=False):
    """The keys of ``kernel_options=``, for type checkers (PyTorch's ``FlexKernelOptions``, extended).

    A plain dict works the same; every key is optional. Meanings are on :class:`KernelOptions` and
    in docs/kernel_options.md. PyTorch's spellings (``fwd_*``, ``BLOCK_M1``...) and its hint-only
    keys are accepted; ``BACKEND`` takes flexattn's values, not PyTorch's "FLASH"/"TRITON_DECODE".

    Example:
        >>> options: FlexKernelOptions = {"BLOCK_M": 64, "BLOCK_N": 64, "PRESCALE_QK": True}
        >>> KernelOptions.from_user(options).BLOCK_M
        64
    """

    BACKEND: Literal["AUTO", "TRITON", "REFERENCE", "CPU"]
    PREFILL_KERNEL: Literal["TRITON", "GLUON", "AUTO"] | None
    BACKWARD_KERNEL: Literal["TRITON", "GLUON"]
    DECODE_MERGE: Literal["KERNEL", "FUSED"]
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    fwd_BLOCK_M: int
    fwd_BLOCK_N: int
    fwd_num_warps: int
    fwd_num_stages: int
    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    bwd_BLOCK_M1: int
    bwd_BLOCK_N1: int
    bwd_BLOCK_M2: int
    bwd_BLOCK_N2: int
    bwd_num_warps: int
    bwd_num_stages: int
    PRESCALE_QK: bool
    ROWS_GUARANTEED_SAFE: bool
    USE_TMA: bool
    deterministic: bool
    autotune: bool
    OUTPUT_LOGSUMEXP: bool
    FORCE_USE_FLEX_ATTENTION: bool
    BLOCKS_ARE_CONTIGUOUS: bool
    WRITE_DQ: bool


@dataclass(frozen=True)
class KernelOptions:
    """Validated kernel options. Every field may be left at its default.

    Fields:
        BACKEND: "AUTO" (Triton kernels for CUDA tensors, the CPU fast path for CPU tensors in
            fp32/bf16/fp16, the reference backend for fp64), "TRITON" (always the Triton kernels;
            on CPU tensors this needs ``TRITON_INTERPRET=1``), "CPU" (the CPU fast path,
            ``flexattn.cpu``; CPU tensors only) or "REFERENCE" (the chunked PyTorch reference
            backend on any device).
        PREFILL_KERNEL: which forward kernel runs prefill calls: None (the default: on sm_90 the
            Gluon forward where it can run at head dim 128 and over paged K/V caches, else Triton's),
            "TRITON" (always Triton's), "GLUON" (the warp-specialized Gluon forward for Hopper,
            ``kernels/hopper/``; an error naming what it lacks where it cannot run) or "AUTO" (Gluon
            wherever it can run, else Triton). Either forward's lse serves either backward.
        BACKWARD_KERNEL: which backward runs: "TRITON" (the default: ``kernels/backward.py``) or
            "GLUON" (the warp-specialized Gluon backward for Hopper, ``kernels/hopper/backward_ws.py``:
            dK, dV and dQ in one kernel, dQ summed by fp32 atomics; identity and additive score mods
            without learnable captures, KV_BLOCK 128; an error naming what it lacks elsewhere, and
            under ``deterministic``, whose dQ must not depend on the order of atomics).
        DECODE_MERGE: how the split-KV decode kernel combines its key splits: "FUSED" (the default:
            the last split of each tile to finish merges them in the same launch; one launch per
            decode call) or "KERNEL" (a second, merge kernel).
        BLOCK_M, BLOCK_N: forward tile sizes (queries x keys). ``None`` lets the kernel choose.
            Must divide the BlockMask's (Q_BLOCK, KV_BLOCK) and be powers of two >= 16.
        num_warps, num_stages: forward launch parameters. ``None`` lets the kernel choose.
        bwd_BLOCK_M1, bwd_BLOCK_N1: backward dK/dV tiles (queries x keys).
        bwd_BLOCK_M2, bwd_BLOCK_N2: backward dQ tiles (queries x keys).
        bwd_num_warps, bwd_num_stages: backward launch parameters.
        ROWS_GUARANTEED_SAFE: promise that no query row is fully masked, so the kernel may skip
            the guards that keep such rows at out = 0, lse = -inf.
        USE_TMA: load Q/K/V tiles with Hopper tensor descriptors where supported.
        deterministic: make gradients of captured tensors bitwise reproducible run to run.
        autotune: search tile sizes on first use of a shape class and cache the choice on disk.
        fast_math: with fp16/bf16 inputs on NVIDIA GPUs, ``torch.tanh`` in a score_mod becomes the
            hardware ``tanh.approx.f32`` (relative error <= 2**-11, below the rounding of the scores
            to the input dtype), and on CPU ``2 * sigmoid(2x) - 1`` (absolute error ~2e-7), except
            where a value decides a mask bit or an index. fp32 inputs always get the exact tanh.
            False: exact everywhere (docs/kernel_options.md).
    """

    BACKEND: str = "AUTO"
    PREFILL_KERNEL: str | None = None
    BACKWARD_KERNEL: str = "TRITON"
    DECODE_MERGE: str = "FUSED"
    BLOCK_M: int | None = None
    BLOCK_N: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    bwd_BLOCK_M1: int | None = None
    bwd_BLOCK_N1: int | None = None
    bwd_BLOCK_M2: int | None = None
    bwd_BLOCK_N2: int | None = None
    bwd_num_warps: int | None = None
    bwd_num_stages: int | None = None
    ROWS_GUARANTEED_SAFE: bool = False
    USE_TMA: bool = False
    deterministic: bool = False
    autotune: bool = False
    fast_math: bool = True

    def __post_init__(self) -> None:
        if self.BACKEND not in BACKENDS:
            raise ValueError(f"kernel_options['BACKEND'] must be one of {BACKENDS}, got {self.BACKEND!r}.")
        if self.PREFILL_KERNEL is not None and self.PREFILL_KERNEL not in PREFILL_KERNELS:
            raise ValueError(
                f"kernel_options['PREFILL_KERNEL'] must be None or one of {PREFILL_KERNELS}, "
                f"got {self.PREFILL_KERNEL!r}."
            )
        if self.BACKWARD_KERNEL not in BACKWARD_KERNELS:
            raise ValueError(
                f"kernel_options['BACKWARD_KERNEL'] must be one of {BACKWARD_KERNELS}, "
                f"got {self.BACKWARD_KERNEL!r}."
            )
        if self.BACKWARD_KERNEL == "GLUON" and self.deterministic:
            raise ValueError(
                "kernel_options BACKWARD_KERNEL='GLUON' sums dQ with atomics, whose order varies run to run: "
                "it cannot be deterministic; use BACKWARD_KERNEL='TRITON' with deterministic=True."
            )
        if self.DECODE_MERGE not in DECODE_MERGES:
            raise ValueError(
                f"kernel_options['DECODE_MERGE'] must be one of {DECODE_MERGES}, got {self.DECODE_MERGE!r}."
            )
        for name in ("BLOCK_M", "BLOCK_N", "bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 16 or value & (value - 1)):
                raise ValueError(f"kernel_options['{name}'] must be a power of two >= 16, got {value!r}.")
        for name in ("num_warps", "bwd_num_warps"):
            value = getattr(self, name)
            if value is not None and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"kernel_options['{name}'] must be 1, 2, 4, 8 or 16, got {value!r}.")
        for name in ("num_stages", "bwd_num_stages"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= 8):
                raise ValueError(f"kernel_options['{name}'] must be an int in 1..8, got {value!r}.")
        for name in (
            "ROWS_GUARANTEED_SAFE",
            "USE_TMA",
            "deterministic",
            "autotune",
            "fast_math",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"kernel_options['{name}'] must be a bool, got {getattr(self, name)!r}.")

    def kernel_only_changes(self) -> list[str]:
        """The options set away from their defaults that only the Triton/Gluon kernels read (tiles,
        launch parameters, kernel choices): a call that runs the CPU or reference backend warns about
        them (``dispatch.choose_backend``, ``KernelOptionsWarning``) rather than ignore them."""
        return [name for name in KERNEL_ONLY if getattr(self, name) != getattr(_DEFAULT, name)]

    @classmethod
    def from_user(
        cls, kernel_options: FlexKernelOptions | dict[str, Any] | KernelOptions | None
    ) -> KernelOptions:
        """Validate a user's ``kernel_options`` dict (PyTorch spellings accepted) into KernelOptions."""
        if kernel_options is None:
            return _DEFAULT if cls is KernelOptions else cls()
        if isinstance(kernel_options, KernelOptions):
            return kernel_options
        if not isinstance(kernel_options, dict):
            raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in kernel_options.items():
            if key in _ACCEPTED_NO_OPS:
                continue
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ValueError(
                    f"Unknown kernel_options key {key!r}. Valid keys: "
                    f"{sorted(known | set(_ALIASES) | set(_ACCEPTED_NO_OPS))}."
                )
            if name in values and values[name] != value:
                raise ValueError(f"kernel_options sets {name!r} twice with different values (via {key!r}).")
            values[name] = value
        return cls(**values)


DEFAULT_OPTIONS = KernelOptions()  # what ``kernel_options=None`` means; the launchers' default too


_DEFAULT = DEFAULT_OPTIONS
_PARSED: dict[tuple, KernelOptions] = {}  # parse_options: (key, type, value) items -> options
_PARSED_SIZE = 256


def parse_options(kernel_options: FlexKernelOptions | dict[str, Any] | KernelOptions | None) -> KernelOptions:
    """:meth:`KernelOptions.from_user`, remembered for repeat calls with equal dicts (eager calls).

    The memo keys on every item's type as well as its value (``True == 1``, but ``BLOCK_M=True`` is
    refused), and only dicts of hashable values are remembered; errors are raised on every call.
    Not for code that torch.compile traces (the memo is module state): that calls ``from_user``.

    Example:
        >>> parse_options({"BLOCK_M": 64}) is parse_options({"BLOCK_M": 64})
        True
    """
    if not isinstance(kernel_options, dict):
        return KernelOptions.from_user(kernel_options)
    try:
        key = tuple((name, type(value), value) for name, value in kernel_options.items())
        parsed = _PARSED.get(key)
    except TypeError:  # an unhashable value: parse (and refuse) it every time
        return KernelOptions.from_user(kernel_options)
    if parsed is None:
        parsed = KernelOptions.from_user(kernel_options)
        if len(_PARSED) >= _PARSED_SIZE:
            _PARSED.clear()
        _PARSED[key] = parsed
    return parsed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fast_math_for(options: KernelOptions, dtype: torch.dtype | None) -> bool:
    """Approximations in the score mod only where their error is below the inputs' rounding:
    ``options.fast_math`` and fp16 / bf16 inputs."""
    return options.fast_math and dtype in (torch.float16, torch.bfloat16)
