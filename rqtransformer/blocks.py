"""The transformer pieces both RQ-Transformer stacks share: pre-norm blocks with a per-token `step` for
cached sampling, causal self-attention and the KV cache it writes (see model.py for how they are used)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu import linear, native_gelu


class KVCache(nn.Module):
    """Keys and values of one attention layer for incremental decoding: kv [B, 2, heads, length, dim_head].

    Keys and values share one buffer so that each step writes both with a single copy. Caches live
    outside the model (one set per `generate` call), so concurrent calls on one model do not collide.
    """

    def __init__(self, batch_size: int, heads: int, length: int, dim_head: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, 2, heads, length, dim_head)
        # empty, not zeros: every position is written before it is read, so zeroing only costs page faults
        self.register_buffer("kv", torch.empty(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: int, kv: torch.Tensor) -> torch.Tensor:
        """Write kv [B, 2, heads, n, dim_head] at positions [pos, pos+n) -> filled kv [B, 2, heads, pos+n, dim_head]."""
        cache, end = self.kv, pos + kv.shape[3]
        cache[:, :, :, pos:end] = kv
        return cache[:, :, :, :end]


# On CPU, torch's fused attention kernel is tuned for long sequences: up to this length plain matmuls are faster.
SHORT_SEQUENCE = 64


def causal_attention(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention over q, k, v [B, heads, n, e] -> [B, heads, n, e]."""
    n = q.shape[-2]
    if q.device.type != "cpu" or n > SHORT_SEQUENCE:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, n, n]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    weights = F.dropout(scores.masked_fill(future, float("-inf")).softmax(-1), dropout_p)
    return weights @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """x [B, n, dim] at positions [pos, pos+n) -> [B, n, dim].

        Without a cache: causal attention over x. With one: k, v are written at [pos, pos+n) and the
        queries attend over positions [0, pos+n) (n > 1 only from pos 0, causally: a prefill).
        """
        B, n, _ = x.shape
        # views, not einops, and one token needs no permute (nor the transpose below): sampling runs this per
        # layer and token, where each small op counts
        qkv = self.qkv(x)  # [B, n, 3 * dim]
        if n == 1:
            qkv = qkv.view(B, 3, self.heads, 1, -1)  # [B, 3, heads, 1, dim_head]
        else:
            qkv = qkv.view(B, n, 3, self.heads, -1).permute(0, 2, 3, 1, 4)  # [B, 3, heads, n, dim_head]
        q, kv = qkv[:, 0], qkv[:, 1:]
        if cache is not None:
            if n > 1 and pos:
                raise ValueError(f"several new tokens ({n}) can only be written from position 0, got pos={pos}")
            kv = cache.update(pos, kv)  # [B, 2, heads, pos+n, dim_head]
        k, v = kv.unbind(1)
        if cache is not None and n == 1:  # one query over the filled prefix: no mask needed
            y = v if pos == 0 else F.scaled_dot_product_attention(q, k, v)  # at pos 0, one key: its value
        else:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = self.proj(y.reshape(B, 1, -1) if n == 1 else y.transpose(1, 2).reshape(B, n, -1))  # [B, n, dim]
        return self.resid_drop(y) if self.training else y


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.drop(x) if self.training else x


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, c):  # c: RQTransformerConfig (dim, heads, dropout, mlp_ratio)
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.dim), SelfAttention(c.dim, c.heads, c.dropout)
        self.ln2, self.mlp = nn.LayerNorm(c.dim), MLP(c.dim, c.mlp_ratio * c.dim, c.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:  # [B, n, dim]
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.mlp(self.ln2(x))

    def step(self, x: torch.Tensor, kv: torch.Tensor, pos: int) -> torch.Tensor:
        """One token x [B, dim] at position pos, its layer's cache buffer kv [B, 2, heads, length, dim_head]
        -> [B, dim]: forward(x[:, None], cache, pos)[:, 0] in eval mode, with fewer Python calls and tensor ops."""
        attn, B = self.attn, x.shape[0]
        qkv = linear(attn.qkv, self.ln1(x)).view(B, 3, attn.heads, 1, -1)  # [B, 3, heads, 1, dim_head]
        kv.narrow(3, pos, 1).copy_(qkv[:, 1:])
        if pos:  # one query over the filled prefix: no mask needed
            k, v = kv.narrow(3, 0, pos + 1).unbind(1)  # [B, heads, pos+1, dim_head] each
            y = F.scaled_dot_product_attention(qkv.select(1, 0), k, v)
        else:  # one key: its value
            y = qkv.select(1, 2)
        x = x + linear(attn.proj, y.reshape(B, -1))
        return x + linear(self.mlp.fc2, native_gelu(linear(self.mlp.fc1, self.ln2(x))))
