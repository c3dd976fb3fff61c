"""A small Llama-style decoder with random weights, for examples/generate.py.

Pre-norm blocks of grouped-query attention with rotary position embeddings (RoPE) and a SwiGLU MLP,
RMSNorm everywhere, no biases. The model computes every projection itself and hands the attention
of each layer to an ``attend(layer, q, k, v)`` callable: that callable owns the KV cache (what it
stores, how it reads it), so the same weights run with every cache implementation of
``kv_caches.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# attend(layer, q (B, Hq, L, E), k (B, Hkv, L, E), v (B, Hkv, L, E)) -> (B, Hq, L, E):
# q and k already rotated; k and v are the rows of this call (the cache holds the earlier ones).
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Config:
    vocab_size: int = 32000
    n_layers: int = 8
    dim: int = 2048  # residual width = n_heads * head_dim
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key / value heads (GQA: n_heads // n_kv_heads query heads share one)
    ffn_dim: int = 8192  # SwiGLU hidden width
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def check(self) -> None:
        """Raise ValueError naming the field when the sizes do not fit together."""
        if self.dim % self.n_heads:
            raise ValueError(f"Config: dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"Config: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Config: head_dim={self.head_dim} must be even (RoPE rotates pairs)")


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, L, head_dim / 2) fp32 of the rotation at each token's position (B, L)."""
    inv_freq = theta ** -(
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, L, E / 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of every head vector of x (B, H, L, E) by the position's angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, L, E / 2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_width = cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.dim + 2 * kv_width, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, L, _ = x.shape
        cfg, E = self.cfg, self.cfg.head_dim
        q, k, v = self.wqkv(x).split([cfg.dim, cfg.n_kv_heads * E, cfg.n_kv_heads * E], dim=-1)
        q = q.view(B, L, cfg.n_heads, E).transpose(1, 2)  # (B, Hq, L, E)
        k = k.view(B, L, cfg.n_kv_heads, E).transpose(1, 2)  # (B, Hkv, L, E)
        v = v.view(B, L, cfg.n_kv_heads, E).transpose(1, 2)
        y = attend(self.layer, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (B, Hq, L, E)
        return self.wo(y.transpose(1, 2).reshape(B, L, cfg.dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up in one matmul."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend: Attend) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attend)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token ids -> next-token logits; ``attend`` supplies each layer's attention and KV cache."""

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, vocab), or (N, vocab) of the rows ``last`` (N, 2) = (batch, token) picks.

        Args:
            tokens: int64 (B, L); positions: (B, L), each token's position in its own sequence (RoPE).
            attend: the attention of every layer (see ``Attend``).
            last: the rows whose logits are needed (e.g. each prompt's last token), or None for all.
        """
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(tokens)  # (B, L, D)
        for block in self.blocks:
            x = block(x, cos, sin, attend)
        if last is not None:
            x = x[last[:, 0], last[:, 1]]  # (N, D)
        return self.head(self.norm(x)).float()
