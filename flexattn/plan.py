"""The plan of one attention call on the Triton kernels: compiled mods, block tables, scale, options.

Built once per call by :func:`plan_attention` (eager calls, from the user's mods) or by
``custom_ops`` (compiled calls, from the stored mods bound to the call's captured tensors); both end
in :class:`AttentionPlan`, whose ``forward`` / ``backward`` launch the kernels and whose ``explain``
says what will run and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexattn.block_mask import DEFAULT_BLOCK_SIZE, BlockMask, noop_block_mask
from flexattn.block_mask_build import complete_q_side
from flexattn.compiler import compile_mods
from flexattn.compiler.fingerprint import CallFingerprints
from flexattn.kernels.backward import flex_backward
from flexattn.kernels.backward_tiles import BackwardTiles, choose_backward_tiles
from flexattn.kernels.block_tables import BlockTables
from flexattn.kernels.decode import flex_decode
from flexattn.kernels.device import DeviceLimits, device_limits, tma_compatible
from flexattn.kernels.forward import flex_forward
from flexattn.kernels.hopper.choice import (
    INLINE_FAILURES,
    PrefillForward,
    choose_prefill_forward,
    default_wants_gluon,
)
from flexattn.kernels.kernel_choice import KernelChoice, choose_kernel, decode_launch
from flexattn.kernels.mods import KernelMod
from flexattn.kernels.paged_kv import PagedKV
from flexattn.kernels.positions import NO_POSITIONS, Positions
from flexattn.kernels.tiles import Tiles, forward_tiles
from flexattn.options import KernelOptions, fast_math_for


@dataclass(frozen=True)
class AttentionPlan:
    """Everything the kernels need besides the differentiable tensors."""

    score_mod: KernelMod
    mask_mod: KernelMod
    tables: BlockTables
    scale: float
    options: KernelOptions
    dense: bool = False  # no block mask was given: the decode kernel visits every key, reads no tables
    kv_pages: PagedKV | None = None  # key / value are paged caches read through this table (forward only)
    block_mask: BlockMask | None = None  # eager calls: the mask whose q side the backward completes and keeps

    def choose(
        self, query, key, value, *, positions: Positions | None = None, needs_grad: bool = False,
        prefill_tiles: bool = False, target: DeviceLimits | None = None,
    ) -> KernelChoice:  # fmt: skip
        """Which forward kernel runs (``kernels.kernel_choice.choose_kernel``), with the decode splits."""
        positions = NO_POSITIONS if positions is None else positions
        per_head = not self.dense and self.tables.kv_num_blocks.shape[1] > 1
        kv_len = key.shape[2] if self.kv_pages is None else self.kv_pages.kv_len  # (paged: logical)
        choice = choose_kernel(
            q_len=query.shape[2], kv_len=kv_len, q_heads=query.shape[1], kv_heads=key.shape[1],
            positions_given=not positions.is_default, kv_offset=positions.kv_offset, needs_grad=needs_grad,
            per_head_mask=per_head, prefill_tiles=_prefill_knobs(self.options, prefill_tiles, gluon=True),
            paged=self.kv_pages is not None,
        )  # fmt: skip
        if choice.kind != "decode":
            return choice
        target = device_limits(query.device) if target is None else target
        sparse = not self.dense
        launch = decode_launch(
            batch=query.shape[0], q_heads=query.shape[1], kv_heads=key.shape[1], q_len=query.shape[2],
            kv_len=kv_len, head_dim=query.shape[3], v_head_dim=value.shape[3], dtype=query.dtype,
            q_block=self.tables.q_block if sparse else None,
            kv_block=self.tables.kv_block if sparse else None,
            per_head_mask=per_head, target=target, ragged=positions.kv_lengths is not None,
            page=0 if self.kv_pages is None else self.kv_pages.page_size,
        )  # fmt: skip
        return KernelChoice(choice.kind, choice.reason, launch.splits)  # (replace() costs 2 us a call)

    def forward(
        self, query, key, value, *, tiles: Tiles | None = None, positions: Positions | None = None,
        needs_grad: bool = False,
    ):  # fmt: skip
        """``(out, lse, max_scores)`` from the kernel :meth:`choose` names (prefill or decode); ``tiles``
        forces the prefill kernel with that launch; ``needs_grad``: the caller will run the backward."""
        choice = self.choose(
            query, key, value, positions=positions, needs_grad=needs_grad, prefill_tiles=tiles is not None
        )
        if choice.kind == "unsupported":
            raise ValueError(f"flex_attention: {choice.reason}.")
        if choice.kind == "decode":
            return flex_decode(
                query, key, value, score_mod=self.score_mod, mask_mod=self.mask_mod,
                tables=None if self.dense else self.tables, scale=self.scale, positions=positions,
                splits=choice.splits, paged=self.kv_pages, merge=self.options.DECODE_MERGE,
            )  # fmt: skip
        prefill = self.prefill_forward(query, key, value, tiles_given=tiles is not None)
        if prefill.kind == "unsupported":
            raise ValueError(f"flex_attention: {prefill.reason}.")
        if prefill.kind == "gluon":
            result = self._gluon_forward(query, key, value, prefill)
            if result is not None:
                return result
        return flex_forward(
            query, key, value, score_mod=self.score_mod, mask_mod=self.mask_mod, tables=self.tables,
            scale=self.scale, options=self.options, tiles=tiles, paged=self.kv_pages,
        )  # fmt: skip

    def prefill_forward(
        self, query, key, value, *, tiles_given: bool = False, target: DeviceLimits | None = None
    ) -> PrefillForward:
        """Which prefill forward runs (``kernels.hopper.choice.choose_prefill_forward``): Gluon or Triton."""
        target = device_limits(query.device) if target is None else target
        (Lq, E), (Lkv, Ev) = (query.shape[2], query.shape[3]), (key.shape[2], value.shape[3])
        if self.kv_pages is not None:
            Lkv = self.kv_pages.kv_len  # (the call's logical keys, not the cache's rows)
        requested = self.options.PREFILL_KERNEL
        # (the choice reads tma_ok only when Gluon may run: no TMA checks on the default contiguous path)
        page = 0 if self.kv_pages is None else self.kv_pages.page_size
        triton_only = requested == "TRITON" or (
            requested is None and default_wants_gluon(E, Ev, page) is None
        )
        tma_ok = triton_only or all(tma_compatible(t, target) for t in (query, key, value))
        return choose_prefill_forward(
            requested=requested, target=target, dtype=query.dtype, head_dim=E,
            v_head_dim=Ev, q_block=self.tables.q_block, kv_block=self.tables.kv_block, dense=self.dense,
            scale=self.scale, page=page, tma_ok=tma_ok,
            other_knobs=_prefill_knobs(self.options, tiles_given),
            inline_failure=INLINE_FAILURES.get((self.score_mod.fn, self.mask_mod.fn)),
            tail=Lq % 128 != 0 or Lkv % 128 != 0,
        )  # fmt: skip

    def _gluon_forward(self, query, key, value, prefill: PrefillForward):
        """The Gluon forward's ``(out, lse, max_scores)``; None (remembered) where AUTO or the default
        chose it and it does not build for these mods (a compile error, too few resources, a failed
        compiler pass), so that the Triton forward runs instead; PREFILL_KERNEL='GLUON' raises."""
        import triton

        from flexattn.kernels.hopper.forward_ws import gluon_forward  # Gluon loads only when chosen

        try:
            return gluon_forward(
                query, key, value, score_mod=self.score_mod, mask_mod=self.mask_mod,
                tables=None if self.dense else self.tables, scale=self.scale, tiles=prefill.tiles,
                paged=self.kv_pages,
            )  # fmt: skip
        except (
            triton.compiler.errors.CompilationError,
            triton.runtime.errors.OutOfResources,
            RuntimeError,
        ) as err:
            if self.options.PREFILL_KERNEL == "GLUON":  # (AUTO and the default fall back to Triton)
                raise
            INLINE_FAILURES[(self.score_mod.fn, self.mask_mod.fn)] = str(err).strip().splitlines()[-1][:200]
            return None

    def backward(
        self, query, key, value, out, lse, dout, dlse, grad_buffers, *, tiles: BackwardTiles | None = None
    ):
        """``(dq, dk, dv)`` from the backward kernels; captured-tensor grads land in ``grad_buffers``.
        ``tiles`` overrides the launch choice (``benchmarks/sweep_tiles.py``)."""
        if self.kv_pages is not None:
            raise ValueError("Paged KV caches are inference only: there is no backward over them.")
        if self.options.BACKWARD_KERNEL == "GLUON":
            if tiles is not None:
                raise ValueError(
                    "explicit backward tiles are the Triton backward's; BACKWARD_KERNEL='GLUON' takes none"
                )
            from flexattn.kernels.hopper.backward_ws import gluon_backward  # Gluon loads only when chosen

            return gluon_backward(
                query, key, value, out, lse, dout, dlse, score_mod=self.score_mod, mask_mod=self.mask_mod,
                tables=None if self.dense else self.backward_tables(), scale=self.scale,
            )  # fmt: skip
        return flex_backward(
            query, key, value, out, lse, dout, dlse, score_mod=self.score_mod, mask_mod=self.mask_mod,
            tables=self.backward_tables(), scale=self.scale, options=self.options,
            grad_buffers=grad_buffers, tiles=tiles,
        )  # fmt: skip

    def backward_tables(self) -> BlockTables:
        """The tables with the transposed (q-side) view the backward reads.

        An eager call's plan holds its BlockMask: the q side is built on the mask's first backward
        and kept there (``BlockMask.tables``), so later calls with that mask reuse it. A plan of the
        custom ops (``torch.compile``) holds only tensors, so a mask flattened without its q side has
        it derived here on every backward and dropped after (see ``custom_ops.traced_attention``).
        """
        if self.block_mask is not None:
            return self.block_mask.tables()
        return complete_q_side(self.tables)

    def explain(
        self, query, key, value, target: DeviceLimits | None = None, positions: Positions | None = None
    ) -> str:
        """What the kernels will run for these inputs and why: the forward kernel (prefill or decode, for
        an inference call), mods, blocks, forward and backward tiles (the launchers' own pure choices,
        ``kernels/kernel_choice.py``, ``kernels/tiles.py`` and ``kernels/backward_tiles.py``)."""
        target = device_limits(query.device) if target is None else target
        choice = self.choose(query, key, value, positions=positions, target=target)
        t = self.tables
        (E, Ev), (Lq, Lkv) = (query.shape[-1], value.shape[-1]), (query.shape[2], key.shape[2])
        fwd = forward_tiles(
            head_dim=E, v_head_dim=Ev, dtype=query.dtype, q_len=Lq, kv_len=Lkv, q_block=t.q_block,
            kv_block=t.kv_block, capability=target.capability, shared_memory_limit=target.shared_memory,
            options=self.options, masked=not self.mask_mod.trivial,
            tile_gathers=self.score_mod.tile_gathers or self.mask_mod.tile_gathers,
        )  # fmt: skip
        bwd = choose_backward_tiles(
            E, Ev, query.dtype, t.q_block, t.kv_block, target.capability, self.options,
            light_score=self.score_mod.light,
        )  # fmt: skip
        mods = f"score_mod {self.score_mod.name!r}" + (" (identity)" if self.score_mod.trivial else "")
        mods += f", mask_mod {self.mask_mod.name!r}" + (" (always true)" if self.mask_mod.trivial else "")
        arch = "interpreter" if target.capability is None else "sm_{}{}".format(*target.capability)
        return "\n".join([
            f"target: {arch}",
            f"forward kernel (inference): {choice}",
            f"prefill forward: {self.prefill_forward(query, key, value, target=target)}",
            f"mods: {mods}",
            f"blocks: {t.q_block}x{t.kv_block}, full blocks {'separate' if t.has_full else 'not separated'}",
            f"forward tiles: {fwd.BLOCK_M}x{fwd.BLOCK_N}, {fwd.num_warps} warps, {fwd.num_stages} stages: "
            f"{fwd.reason}",
            f"backward tiles: dK/dV {bwd.BLOCK_M1}x{bwd.BLOCK_N1}, dQ {bwd.BLOCK_M2}x{bwd.BLOCK_N2}, "
            f"dq {bwd.dq_mode}: {bwd.reason}",
            "backward kernel: " + (
                "Gluon (kernel_options BACKWARD_KERNEL='GLUON': kernels/hopper/backward_ws.py, 128 keys per "
                "CTA, dK/dV/dQ in one kernel, dQ by fp32 atomics; the tiles above are the Triton backward's)"
                if self.options.BACKWARD_KERNEL == "GLUON" else "Triton (kernels/backward.py)"
            ),
        ])  # fmt: skip


PREFILL_KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "autotune")


def _prefill_knobs(options: KernelOptions, tiles_given: bool, gluon: bool = False) -> str | None:
    """What in this call configures the Triton prefill kernel (None: nothing), for the kernel choices;
    ``gluon``: also PREFILL_KERNEL='GLUON' (it asks for a prefill kernel too)."""
    if gluon and options.PREFILL_KERNEL == "GLUON":
        return "kernel_options PREFILL_KERNEL='GLUON'"
    if tiles_given:
        return "explicit prefill tiles"
    knobs = [name for name in PREFILL_KNOBS if getattr(options, name)]
    return f"kernel_options {', '.join(knobs)}" if knobs else None


def block_tables(block_mask: BlockMask | None, q_len: int, kv_len: int, device) -> BlockTables:
    """The kernels' view of ``block_mask``; None means attend everywhere (every block full)."""
    if block_mask is None:
        return noop_tables(q_len, kv_len, torch.device(device))
    return block_mask.tables(q_side=False)  # the backward completes them (AttentionPlan.backward_tables)


# The every-block-full tables by (NQ, NKV, device): they depend on the lengths only through the block
# counts (a decode loop reuses one set for 128 steps) and no kernel writes them.
_NOOP_TABLES: dict[tuple, BlockTables] = {}
_NOOP_TABLES_SIZE = 64


def noop_tables(q_len: int, kv_len: int, device: torch.device) -> BlockTables:
    """The tables of ``noop_block_mask(q_len, kv_len, device)``, built once per block counts.

    Not remembered while a CUDA graph is being captured on the current stream: tensors made then are
    only written when the graph replays, so an eager call must never read them.
    """
    key = (-(-q_len // DEFAULT_BLOCK_SIZE), -(-kv_len // DEFAULT_BLOCK_SIZE), device)
    tables = _NOOP_TABLES.get(key)
    if tables is None:
        tables = noop_block_mask(q_len, kv_len, device).tables()
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_NOOP_TABLES) >= _NOOP_TABLES_SIZE:  # a bound, not an order: start afresh
                _NOOP_TABLES.clear()
            _NOOP_TABLES[key] = tables
    return tables


def plan_attention(
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    q_len: int,
    kv_len: int,
    scale: float,
    options: KernelOptions,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    kv_pages: PagedKV | None = None,
    fingerprints: CallFingerprints | None = None,
) -> AttentionPlan:
    """Compile the mods for ``device`` (cached by structure) and bundle them with the block tables.

    ``dtype`` (the inputs'): fp16/bf16 allow ``options.fast_math`` (hardware tanh in the score mod).
    ``kv_pages``: the keys / values are paged caches (``kv_len`` is then the logical length).
    ``fingerprints``: the mods' fingerprints from this call's checks (each mod is keyed once a call).

    Example (CPU through the interpreter, ``TRITON_INTERPRET=1``)::

        plan = plan_attention(None, None, 40, 40, 0.25, KernelOptions(BACKEND="TRITON"), torch.device("cpu"))
        out, lse, max_scores = plan.forward(q, k, v)
    """
    fast_math = fast_math_for(options, dtype)
    mask_mod = None if block_mask is None else block_mask.mask_mod
    score, mask = compile_mods(
        score_mod, mask_mod, device=device, fast_math=fast_math, fingerprints=fingerprints
    )
    tables = block_tables(block_mask, q_len, kv_len, device)
    dense = block_mask is None
    return AttentionPlan(score, mask, tables, scale, options, dense, kv_pages, block_mask=block_mask)
