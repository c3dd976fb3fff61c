"""Positions: where a call's query and key rows sit in their sequences.

Mods always see absolute positions. Prefill over a whole sequence needs nothing (row i is position i);
decoding, chunked prefill and context parallelism run on rows that start elsewhere:

- ``q_offset``: query row ``i`` of batch ``b`` is position ``q_offset[b] + i`` (an int for the whole
  batch, or an int32 tensor ``(B,)``: each sequence's query tokens after its own cache);
- ``kv_offset``: key row ``j`` is position ``kv_offset + j`` (a shard of the keys; an int);
- ``kv_lengths``: int32 tensor ``(B,)`` or None: sequence ``b`` has ``kv_lengths[b]`` keys, rows at or
  beyond it do not exist (a ragged batch of caches padded to one ``Lkv``).

One type for every kernel kind (prefill, decode, paged, ring attention), so the launchers take a
``Positions`` instead of three loose arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Positions:
    """Offsets and lengths of one call's rows; the default is plain prefill (row i is position i)."""

    q_offset: int | torch.Tensor = 0
    kv_offset: int = 0
    kv_lengths: torch.Tensor | None = None

    @property
    def is_default(self) -> bool:
        """True when every row is at its own index and every key exists (the prefill kernels' case)."""
        return (
            isinstance(self.q_offset, int)
            and self.q_offset == 0
            and self.kv_offset == 0
            and self.kv_lengths is None
        )

    def check(self, batch: int, kv_len: int, device: torch.device) -> None:
        """Raise ValueError naming the field when these positions do not fit a call of this batch.

        The values of tensors are checked only where reading them costs no host-GPU synchronisation
        (CPU tensors): on a GPU only dtype, shape and device are, so a call stays sync-free (and
        capturable in a CUDA graph). Out-of-range values there are the caller's error; the kernels
        keep every memory access in bounds regardless.
        """
        if isinstance(self.q_offset, torch.Tensor):
            _check_per_sequence("q_offset", self.q_offset, batch, device)
            if host_readable(self.q_offset) and int(self.q_offset.min()) < 0:
                raise ValueError("Positions.q_offset: offsets must be >= 0")
        elif not isinstance(self.q_offset, int) or isinstance(self.q_offset, bool) or self.q_offset < 0:
            raise ValueError(
                f"Positions.q_offset must be an int >= 0 or an int32 tensor (B,), got {self.q_offset!r}"
            )
        if not isinstance(self.kv_offset, int) or isinstance(self.kv_offset, bool) or self.kv_offset < 0:
            raise ValueError(f"Positions.kv_offset must be an int >= 0, got {self.kv_offset!r}")
        if self.kv_lengths is not None:
            _check_per_sequence("kv_lengths", self.kv_lengths, batch, device)
            if host_readable(self.kv_lengths) and (
                int(self.kv_lengths.min()) < 0 or int(self.kv_lengths.max()) > kv_len
            ):
                raise ValueError(
                    f"Positions.kv_lengths must lie in [0, {kv_len}] (the key tensor's length); "
                    "pad the cache to the longest sequence"
                )

    def q_end(self, q_len: int) -> int | None:
        """One past the last query position of a call with ``q_len`` query tokens, or None when the
        offsets live on a GPU (reading them would synchronise)."""
        if isinstance(self.q_offset, torch.Tensor):
            if not host_readable(self.q_offset):
                return None
            return int(self.q_offset.max()) + q_len if self.q_offset.numel() else q_len
        return self.q_offset + q_len


NO_POSITIONS = Positions()  # tokens at 0..Lq-1, every key present (frozen: one shared by every call)


def host_readable(t: torch.Tensor) -> bool:
    """Values readable without a host-GPU synchronisation (and there are some): ``Positions.check``
    reads them, so a cache of calls must not skip it (``flexattn/call_cache.py``)."""
    return t.device.type == "cpu" and t.numel() > 0


def _check_per_sequence(name: str, t: torch.Tensor, batch: int, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"Positions.{name} must be an int32 tensor of shape ({batch},) (one per sequence), "
            f"got {t.dtype} {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(
            f"Positions.{name} is on {t.device}, the inputs on {device}: move it with .to(device)"
        )
