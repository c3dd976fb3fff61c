"""KV caches and attention for examples/generate.py: one class per implementation, same interface.

A batch of B prompts of mixed lengths is prefilled once, then decoded one token per sequence per
step. Every implementation owns its caches (all layers) and gives the model its ``attend`` for
each call:

- :class:`SdpaCache` (``sdpa``): ``F.scaled_dot_product_attention`` over dense caches
  ``(B, Hkv, max_len, E)`` per layer, the prompts right-padded to the longest. Prefill is causal
  SDPA over the padded batch (right padding needs no mask: a real query never sees a later key);
  decode writes each sequence's key at its own position and masks the keys past it. Each query
  head group reads its kv head without a copy: the group's heads become query rows, so the masked
  call can take a fused kernel (SDPA's ``enable_gqa`` with a mask falls back to its math kernel).
- :class:`FlexattnPaged` (``flexattn``): flexattn with its paged cache (``flexattn.paged``): the
  prompts packed into one row with a causal-within-each-prompt block mask (no padding), keys
  written into pages reserved per sequence. Each sequence's pages are reserved once, when the cache
  is made, for its whole generation (prompt + new tokens: the pages a run needs, no more), and the
  decode mask is converted to the page table once; every step then bounds the keys by
  ``Positions`` (query offsets, key lengths on the device), so a step's calls repeat one call key
  (flexattn's prepared calls) and launch no mask conversion. (PyTorch's flex_attention has no
  ``Positions``: torch-flex converts a mask with the step's ``kv_len`` every step.)
- :class:`FlexattnDense` (``flexattn-dense``): the same packed prefill, dense padded caches, and
  decode through ``Positions`` (query offsets and ragged key lengths), flexattn's decode kernel.
- :class:`TorchFlexPaged` (``torch-flex``): PyTorch's ``flex_attention`` (compiled on CUDA) with
  PyTorch's experimental ``PagedAttention``: the same packed prefill and page bookkeeping.

Decode ``mode``: ``"eager"`` launches each step from Python with the host's view of the lengths
(index tensors the allocators check on the CPU); ``"static"`` runs the step a CUDA graph captures,
eagerly: it reads its tokens and positions from static device buffers only; ``"graph"`` (CUDA)
captures that step once (at the first decode step, with the buffers of the first run) and replays
it for every later step and run. torch-flex reserves pages on the host before each step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from llama_decoder import Config, Decoder

from flexattn import Positions, create_block_mask, flex_attention, noop_mask
from flexattn.paged import PagedAttention

Q_BLOCK = 128
MODES = ("eager", "static", "graph")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# Shared pieces: the packed prefill layout, the causal-within-each-prompt mask, CUDA graphs.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """B prompts concatenated into one row of T = sum(lengths) tokens (no padding)."""

    tokens: torch.Tensor  # int64 (1, T)
    positions: torch.Tensor  # int64 (1, T): each token's position in its own prompt
    seq: torch.Tensor  # int64 (T,): the prompt each token belongs to
    pos: torch.Tensor  # int64 (T,): = positions[0]
    last: torch.Tensor  # int64 (B, 2): (0, index of each prompt's last token) for the logits
    doc_ids: torch.Tensor  # int32 (T,): = seq, for the mask
    host_seq: torch.Tensor  # seq (T,) and pos (T, 1) on the CPU: the index tensors every layer's
    host_pos: torch.Tensor  # paged assign takes (the same tensors: it checks and gathers them once)

    @staticmethod
    def of(prompts: list[torch.Tensor], device: torch.device) -> Packed:
        host = torch.device("cpu")  # built on the host (named: a default device must not move it)
        lengths = torch.tensor([len(p) for p in prompts], device=host)
        seq = torch.repeat_interleave(torch.arange(len(prompts), device=host), lengths)  # (T,)
        pos = torch.cat([torch.arange(n, device=host) for n in lengths.tolist()])  # (T,)
        ends = lengths.cumsum(0) - 1
        last = torch.stack([torch.zeros_like(ends), ends], dim=1)
        tokens = torch.cat(prompts)[None]
        return Packed(
            tokens.to(device), pos[None].to(device), seq.to(device), pos.to(device), last.to(device),
            seq.to(device, torch.int32), seq, pos[:, None],
        )  # fmt: skip


def causal_within_prompts(doc_ids: torch.Tensor) -> Callable:
    """Mask mod over a packed row: a token sees the earlier tokens of its own prompt."""

    def causal_within_prompt(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    return causal_within_prompt


class GraphedStep:
    """A zero-argument step run as a CUDA graph: warmed up eagerly on a side stream, captured at
    the first call, replayed at every call (the first included). Returns the captured outputs."""

    def __init__(self, step: Callable[[], torch.Tensor]):
        self.step, self.graph, self.out = step, None, None

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles and fills every cache outside the capture
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.step()
            self.graph = graph
        self.graph.replay()
        return self.out


# ---------------------------------------------------------------------------------------------------
# The common driver: host bookkeeping per step, eager or graphed decode.
# ---------------------------------------------------------------------------------------------------


class KVCache:
    """One attention implementation and its caches for B sequences of known prompt lengths.

    ``start()`` begins a run (same prompt lengths each time), ``prefill(model, prompts)`` returns the
    logits of every prompt's last token (B, vocab) fp32, ``decode(model, tokens (B,))`` appends one
    token per sequence and returns the next logits (B, vocab).
    """

    name = "?"

    def __init__(
        self, cfg: Config, lengths: list[int], new_tokens: int, device: torch.device, dtype: torch.dtype,
        mode: str = "eager",
    ):  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"{self.name}: CUDA graphs need a CUDA device, got --device {device}")
        self.cfg, self.prompt_lengths, self.device, self.dtype = cfg, list(lengths), device, dtype
        self.B, self.max_len = len(lengths), max(lengths) + new_tokens
        self.mode = mode
        self.lengths = list(lengths)  # tokens in each sequence's cache (host)
        self.batch = torch.arange(self.B, device=device)
        # where the next tokens go, (B, 1) on the device: advanced there after every step, so a decode
        # loop copies nothing from the host (a blocking host-to-device copy waits for the GPU)
        self.positions = torch.zeros(self.B, 1, dtype=torch.long, device=device)
        self.static_tokens = torch.zeros(self.B, 1, dtype=torch.long, device=device)
        self.graphed: GraphedStep | None = None

    def zeros_cache(self, *shape: int) -> list[torch.Tensor]:
        """One zeroed cache per layer (zeros: masked rows of a visited tile must stay finite)."""
        return [torch.zeros(*shape, device=self.device, dtype=self.dtype) for _ in range(self.cfg.n_layers)]

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def start(self) -> None:
        self.lengths = list(self.prompt_lengths)
        self.positions.copy_(torch.tensor(self.prompt_lengths, device="cpu")[:, None])

    def prefill(self, model: Decoder, prompts: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def grow(self) -> None:
        """Host work before a decode step: room for one more token per sequence."""

    def step(
        self, model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, host: torch.Tensor | None
    ) -> torch.Tensor:
        """One decode step: tokens, positions int64 (B, 1) on the device -> logits (B, vocab).
        ``host``: the positions on the CPU when the step runs eagerly; None inside a CUDA graph
        (which must read the device buffers only)."""
        raise NotImplementedError

    def decode(self, model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
        self.grow()
        if self.mode == "eager":
            host = torch.tensor(self.lengths, device="cpu")[:, None]  # = self.positions, on the CPU
            logits = self.step(model, tokens[:, None], self.positions, host=host)
        else:
            self.static_tokens.copy_(tokens[:, None])
            static_step = lambda: self.step(model, self.static_tokens, self.positions, host=None)  # noqa: E731
            if self.mode == "static":
                logits = static_step()
            else:
                if self.graphed is None:
                    self.graphed = GraphedStep(static_step)
                logits = self.graphed()
        self.positions += 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits


# ---------------------------------------------------------------------------------------------------
# (b) SDPA over dense, padded, preallocated caches.
# ---------------------------------------------------------------------------------------------------


class SdpaCache(KVCache):
    name = "sdpa"

    def __init__(self, cfg, lengths, new_tokens, device, dtype, mode="eager"):
        super().__init__(cfg, lengths, new_tokens, device, dtype, mode)
        self.k = self.zeros_cache(self.B, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.v = self.zeros_cache(self.B, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.keys = torch.arange(self.max_len, device=device)

    def prefill(self, model, prompts):
        L = max(self.prompt_lengths)
        tokens = torch.zeros(self.B, L, dtype=torch.long, device="cpu")  # right-padded with token 0
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = p
        last = torch.tensor([[b, n - 1] for b, n in enumerate(self.prompt_lengths)], device=self.device)
        positions = torch.arange(L, device=self.device).expand(self.B, L)

        def attend(layer, q, k, v):  # q (B, Hq, L, E); k, v (B, Hkv, L, E)
            self.k[layer][:, :, :L] = k
            self.v[layer][:, :, :L] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return model(tokens.to(self.device), positions, attend, last)

    def step(self, model, tokens, positions, host):
        # eager: read the caches up to the longest sequence; a graph reads all of them
        length = self.max_len if host is None else int(host.max()) + 1
        pos = positions[:, 0]  # (B,)
        allowed = (self.keys[:length] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, length)
        B, G = self.B, self.cfg.n_heads // self.cfg.n_kv_heads

        def attend(layer, q, k, v):  # q (B, Hq, 1, E); k, v (B, Hkv, 1, E)
            kc, vc = self.k[layer], self.v[layer]
            kc[self.batch, :, pos] = k[:, :, 0]
            vc[self.batch, :, pos] = v[:, :, 0]
            rows = q.reshape(B, self.cfg.n_kv_heads, G, q.shape[-1])  # (B, Hkv, G, E): a group's heads
            out = F.scaled_dot_product_attention(
                rows, kc[:, :, :length], vc[:, :, :length], attn_mask=allowed
            )
            return out.reshape(q.shape)

        return model(tokens, positions, attend)[:, 0]


# ---------------------------------------------------------------------------------------------------
# (a) flexattn: packed prefill, paged caches (and the dense variant with Positions).
# ---------------------------------------------------------------------------------------------------


class PackedFlexattn(KVCache):
    """flexattn's prefill: the prompts packed into one row, causal within each prompt (no padding).
    Subclasses say where the keys go (``write_prompts``) and how decode reads them (``step``)."""

    def __init__(self, cfg, lengths, new_tokens, device, dtype, mode="eager", kernel_options=None):
        super().__init__(cfg, lengths, new_tokens, device, dtype, mode)
        self.options = kernel_options

    def attention(self, q, k, v, block_mask=None, positions=None):
        return flex_attention(
            q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=self.options, positions=positions
        )

    def write_prompts(self, layer: int, packed: Packed, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the prompts' keys and values (1, Hkv, T, E) of one layer in its caches."""
        raise NotImplementedError

    def prefill(self, model, prompts):
        packed = Packed.of(prompts, self.device)
        T = packed.tokens.shape[1]
        mask = create_block_mask(causal_within_prompts(packed.doc_ids), None, None, T, T, device=self.device)

        def attend(layer, q, k, v):  # q (1, Hq, T, E); k, v (1, Hkv, T, E)
            self.write_prompts(layer, packed, k, v)
            return self.attention(q, k, v, mask)

        return model(packed.tokens, packed.positions, attend, packed.last)


class FlexattnPaged(PackedFlexattn):
    name = "flexattn"

    def __init__(
        self, cfg, lengths, new_tokens, device, dtype, mode="eager", kernel_options=None, page_size=64
    ):
        super().__init__(cfg, lengths, new_tokens, device, dtype, mode, kernel_options)
        self.run_lengths = [n + new_tokens for n in lengths]  # each sequence's keys at the end of a run
        n_pages = sum(cdiv(n, page_size) for n in self.run_lengths)  # what the run needs, no more
        per_seq = cdiv(self.max_len, page_size)
        self.paged = PagedAttention(n_pages, page_size, self.B, device=device, max_pages_per_seq=per_seq)
        self.k = self.zeros_cache(1, cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        self.v = self.zeros_cache(1, cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        kv_block = page_size * max(1, 128 // page_size)  # a multiple of the page, about 128
        # every run writes the same sequences (the prompts' lengths do not change): their pages are
        # reserved once, for the whole generation, and the decode mask (every key of the sequence,
        # in absolute positions; Positions bounds each step's keys) is converted to the page table
        # once. A CUDA graph captured over it stays valid for every run.
        for b in range(self.B):
            self.paged.reserve(b, self.run_lengths[b])
        span = per_seq * page_size
        logical = create_block_mask(
            noop_mask, None, None, span, span, device=device, BLOCK_SIZE=(Q_BLOCK, kv_block)
        )
        self.decode_mask = self.paged.convert_logical_block_mask(logical, self.batch)
        self.batch_cpu = torch.arange(self.B, device="cpu")

    def write_prompts(self, layer, packed, k, v):
        # every token its own row (T, Hkv, 1, E) at (its prompt, its position); host indices: the
        # allocator checks them on the CPU (then copies them to the GPU)
        rows_k, rows_v = k[0].transpose(0, 1)[:, :, None], v[0].transpose(0, 1)[:, :, None]
        self.paged.assign(packed.host_seq, packed.host_pos, rows_k, rows_v, self.k[layer], self.v[layer])

    def step(self, model, tokens, positions, host):
        # eager: host index tensors (the allocator checks them on the CPU, then copies them to the GPU
        # without waiting for it); a graph: the device buffers (the checks skip while capturing)
        batch, where = (self.batch, positions) if host is None else (self.batch_cpu, host)
        offsets = positions[:, 0].to(torch.int32)  # (B,)
        bounds = Positions(q_offset=offsets, kv_lengths=offsets + 1)  # the new key included

        def attend(layer, q, k, v):  # q (B, Hq, 1, E); k, v (B, Hkv, 1, E)
            self.paged.assign(batch, where, k, v, self.k[layer], self.v[layer])
            return self.attention(q, self.k[layer], self.v[layer], self.decode_mask, positions=bounds)

        return model(tokens, positions, attend)[:, 0]


class FlexattnDense(PackedFlexattn):
    name = "flexattn-dense"

    def __init__(self, cfg, lengths, new_tokens, device, dtype, mode="eager", kernel_options=None):
        super().__init__(cfg, lengths, new_tokens, device, dtype, mode, kernel_options)
        self.k = self.zeros_cache(self.B, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.v = self.zeros_cache(self.B, cfg.n_kv_heads, self.max_len, cfg.head_dim)

    def write_prompts(self, layer, packed, k, v):
        self.k[layer][packed.seq, :, packed.pos] = k[0].transpose(0, 1)  # (T, Hkv, E)
        self.v[layer][packed.seq, :, packed.pos] = v[0].transpose(0, 1)

    def step(self, model, tokens, positions, host):
        pos = positions[:, 0]  # (B,)
        offsets = pos.to(torch.int32)
        where = Positions(q_offset=offsets, kv_lengths=offsets + 1)  # the new key included

        def attend(layer, q, k, v):  # q (B, Hq, 1, E); k, v (B, Hkv, 1, E)
            self.k[layer][self.batch, :, pos] = k[:, :, 0]
            self.v[layer][self.batch, :, pos] = v[:, :, 0]
            return self.attention(q, self.k[layer], self.v[layer], positions=where)

        return model(tokens, positions, attend)[:, 0]


# ---------------------------------------------------------------------------------------------------
# (c) PyTorch's flex_attention with PyTorch's PagedAttention.
# ---------------------------------------------------------------------------------------------------


@functools.cache
def torch_flex(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    return torch.compile(torch_flex_attention, dynamic=False) if compiled else torch_flex_attention


class TorchFlexPaged(KVCache):
    name = "torch-flex"

    def __init__(self, cfg, lengths, new_tokens, device, dtype, mode="eager", page_size=64, compiled=True):
        from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPagedAttention

        super().__init__(cfg, lengths, new_tokens, device, dtype, mode)
        self.flex, self.compiled, self.page_size = torch_flex(compiled), compiled, page_size
        n_pages = sum(cdiv(n + new_tokens, page_size) for n in lengths)
        self.paged = TorchPagedAttention(n_pages, page_size, self.B, device=str(device))
        self.k = self.zeros_cache(1, cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        self.v = self.zeros_cache(1, cfg.n_kv_heads, n_pages * page_size, cfg.head_dim)
        self.capacity = [0] * self.B  # host copy of the allocator's capacities (its own live on the GPU)
        per_seq = cdiv(self.max_len, page_size)
        # decode: logical kv blocks 0, 1, 2, ... of every sequence; each step lists those it holds
        blocks = torch.arange(per_seq, device=device, dtype=torch.int32)
        self.logical_blocks = blocks.expand(self.B, 1, 1, per_seq).contiguous()

    def reserve(self, b: int, length: int) -> None:
        # PyTorch's reserve compares with its capacities on the device (a sync): ask only when needed
        if length > self.capacity[b]:
            one = functools.partial(torch.tensor, device=self.device)
            self.paged.reserve(one([b]), one([length]))
            self.capacity[b] = cdiv(length, self.page_size) * self.page_size

    def start(self):
        super().start()
        for b in range(self.B):
            if self.capacity[b]:
                self.paged.erase(torch.tensor([b], device=self.device))
                self.capacity[b] = 0
            self.reserve(b, self.prompt_lengths[b])

    def grow(self):
        for b, n in enumerate(self.lengths):
            self.reserve(b, n + 1)

    def prefill(self, model, prompts):
        from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

        packed = Packed.of(prompts, self.device)
        T = packed.tokens.shape[1]
        mask = torch_create_block_mask(
            causal_within_prompts(packed.doc_ids), None, None, T, T, device=self.device,
            _compile=self.compiled,
        )  # fmt: skip
        pos = packed.pos[:, None]

        def attend(layer, q, k, v):  # q (1, Hq, T, E); k, v (1, Hkv, T, E)
            # every token its own row (T, Hkv, 1, E) at (its prompt, its position)
            rows_k, rows_v = k[0].transpose(0, 1)[:, :, None], v[0].transpose(0, 1)[:, :, None]
            self.paged.assign(packed.seq, pos, rows_k, rows_v, self.k[layer], self.v[layer])
            return self.flex(q, k, v, block_mask=mask, enable_gqa=True)

        return model(packed.tokens, packed.positions, attend, packed.last)

    def step(self, model, tokens, positions, host):
        from torch.nn.attention.flex_attention import BlockMask

        kv_len = positions[:, 0] + 1  # (B,) the new key included
        held = ((kv_len + self.page_size - 1) // self.page_size).to(torch.int32)  # (B,) pages in use
        logical = BlockMask.from_kv_blocks(
            held[:, None, None], self.logical_blocks, BLOCK_SIZE=(Q_BLOCK, self.page_size),
            seq_lengths=(1, self.logical_blocks.shape[-1] * self.page_size),
        )  # fmt: skip
        mask = self.paged.convert_logical_block_mask(logical, self.batch, kv_len)

        def attend(layer, q, k, v):  # q (B, Hq, 1, E); k, v (B, Hkv, 1, E)
            self.paged.assign(self.batch, positions, k, v, self.k[layer], self.v[layer])
            return self.flex(q, self.k[layer], self.v[layer], block_mask=mask, enable_gqa=True)

        return model(tokens, positions, attend)[:, 0]


IMPLEMENTATIONS: dict[str, type[KVCache]] = {
    "sdpa": SdpaCache,
    "flexattn": FlexattnPaged,
    "flexattn-dense": FlexattnDense,
    "torch-flex": TorchFlexPaged,
}
