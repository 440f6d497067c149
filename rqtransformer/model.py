"""RQ-Transformer: an autoregressive prior over residual code stacks `codes [B, h, w, D]`.

A *spatial* transformer runs causally over the h*w positions (row-major). Its input at position t is
the sum of the D code embeddings of position t-1 plus a spatial position embedding; position 0 gets a
start token carrying the class embedding. A *depth* transformer then predicts the D codes of each
position one after another: its input is [spatial_out_t, emb(code_t,1), ..., emb(code_t,D-1)] plus a
depth position embedding, and its output at step d gives the logits of code d.

Class index `num_classes` is the learned "null" class (unconditional / classifier-free guidance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from rqcore.pretrained import PretrainedMixin

from .sampling import generate as _generate


def code_loss(logits: torch.Tensor, codes: torch.Tensor):
    """logits [B, h, w, D, K], codes [B, h, w, D] -> (mean cross-entropy, per-depth accuracy [D])."""
    codes = codes.long()
    # float(): under bf16 autocast the log-softmax over K codes would otherwise run in bf16
    loss = F.cross_entropy(rearrange(logits.float(), "b h w d k -> (b h w d) k"), codes.reshape(-1))
    hits = (logits.detach().argmax(-1) == codes).float()  # [B, h, w, D]
    return loss, rearrange(hits, "b h w d -> (b h w) d").mean(0)


@torch.no_grad()
def per_depth_nll(model, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of each depth [D] over codes [N,h,w,D] given labels [N]."""
    device = model.head.weight.device
    total = torch.zeros(codes.shape[-1])
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size].to(device).long()
        logits = model(c, labels[i:i + batch_size].to(device))  # [B, h, w, D, K]
        ce = F.cross_entropy(rearrange(logits, "b h w d k -> (b h w d) k"), c.reshape(-1), reduction="none")
        total += rearrange(ce, "(n d) -> n d", d=c.shape[-1]).sum(0).float().cpu()
    return total / (codes.shape[0] * codes.shape[1] * codes.shape[2])


@dataclass
class RQTransformerConfig:
    codebook_size: int                  # K, shared by every depth
    code_shape: tuple[int, int, int]    # (h, w, D) of the RQ-VAE codes
    dim: int
    heads: int
    spatial_layers: int
    depth_layers: int
    num_classes: int                    # 0 = unconditional
    dropout: float
    mlp_ratio: int = 4
    class_names: list[str] = field(default_factory=list)  # empty, or one name per class

    def __post_init__(self):
        if not isinstance(self.code_shape, (list, tuple)) or len(self.code_shape) != 3:
            raise ValueError(f"code_shape must be 3 positive integers (h, w, D), got {self.code_shape!r}")
        self.code_shape = tuple(self.code_shape)
        for value in self.code_shape:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"code_shape must be 3 positive integers (h, w, D), got {self.code_shape!r}")
        for name in ("codebook_size", "dim", "heads", "spatial_layers", "depth_layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0 = unconditional), got {self.num_classes!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.class_names = list(self.class_names)
        if not all(isinstance(n, str) for n in self.class_names):
            raise ValueError(f"class_names must be strings, got {self.class_names!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries but num_classes is "
                             f"{self.num_classes}; give one name per class or none")


class KVCache:
    """Static keys and values for incremental decoding: per layer kv [B, 2, heads, length, dim_head].

    Keys and values share one tensor so that each step writes both with a single copy.
    """

    def __init__(self, layers: int, batch_size: int, heads: int, length: int, dim_head: int,
                 device=None, dtype=None):
        shape = (batch_size, 2, heads, length, dim_head)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]


# On CPU, torch's fused attention kernel is tuned for long sequences: for the depth transformer's
# 4 tokens its forward+backward is 3x slower than plain matmuls (measured on 2 cores; even at 64 tokens).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, dim] -> [B, n, dim], causal
        q, k, v = rearrange(self.qkv(x), "b n (three h e) -> three b h n e", three=3, h=self.heads)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(rearrange(y, "b h n e -> b n (h e)")))

    def step(self, x: torch.Tensor, t: int, kv: torch.Tensor) -> torch.Tensor:
        """One new token at position t: x [B, dim]; kv [B, 2, heads, L, dim_head] is written at t."""
        B = x.shape[0]
        qkv = self.qkv(x).view(B, 3, self.heads, 1, -1)  # [B, 3, heads, 1, dim_head]
        kv[:, :, :, t : t + 1] = qkv[:, 1:]
        if t == 0:
            y = qkv[:, 2]  # one key: attention returns its value
        else:  # one query over the filled prefix: no mask needed
            y = F.scaled_dot_product_attention(qkv[:, 0], kv[:, 0, :, : t + 1], kv[:, 1, :, : t + 1])
        return self.proj(y.reshape(B, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, c: RQTransformerConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.dim), SelfAttention(c.dim, c.heads, c.dropout)
        self.ln2, self.mlp = nn.LayerNorm(c.dim), MLP(c.dim, c.mlp_ratio * c.dim, c.dropout)

    def forward(self, x):  # [B, n, dim]
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x, t, kv):  # [B, dim], inference only
        x = x + self.attn.step(self.ln1(x), t, kv)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.ln2(x))))


class RQTransformer(PretrainedMixin, nn.Module):
    config_class = RQTransformerConfig

    def __init__(self, config: RQTransformerConfig):
        super().__init__()
        self.config = c = config
        h, w, D = c.code_shape
        self.code_emb = nn.Embedding(c.codebook_size, c.dim)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)  # last row = null class / start token
        self.spatial_pos = nn.Parameter(torch.zeros(h * w, c.dim))
        self.depth_pos = nn.Parameter(torch.zeros(D, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.spatial_blocks = nn.ModuleList(Block(c) for _ in range(c.spatial_layers))
        self.spatial_norm = nn.LayerNorm(c.dim)
        self.depth_blocks = nn.ModuleList(Block(c) for _ in range(c.depth_layers))
        self.depth_norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.spatial_pos, std=0.02)
        nn.init.normal_(self.depth_pos, std=0.02)
        for blocks in (self.spatial_blocks, self.depth_blocks):  # GPT-2: scale residual projections
            for block in blocks:
                for lin in (block.attn.proj, block.mlp.fc2):
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * len(blocks)))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    generate = _generate

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return self.config.code_shape

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        """Class index of the learned null class (unconditional rows, CFG label dropout)."""
        return self.config.num_classes

    # ---- checks ----------------------------------------------------------------------------------

    def _check_codes(self, codes: torch.Tensor) -> None:
        h, w, D = self.code_shape
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.long, torch.int32, torch.int16,
                                                                        torch.int8, torch.uint8):
            raise ValueError(f"codes must be an integer tensor [B, {h}, {w}, {D}], got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (h, w, D) or codes.shape[0] < 1:
            raise ValueError(f"codes must have shape [B, {h}, {w}, {D}], got {list(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.config.codebook_size:
            raise ValueError(f"code values must be in [0, {self.config.codebook_size}), got range [{lo}, {hi}]")

    def _labels(self, class_labels, batch_size: int, device) -> torch.Tensor:
        """Validated labels [B] in [0, num_classes] (num_classes = null); None = null for all rows."""
        if class_labels is None:
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype.is_floating_point \
                or class_labels.dtype == torch.bool or class_labels.shape != (batch_size,):
            raise ValueError(f"class_labels must be an integer tensor of shape [{batch_size}], got "
                             f"{getattr(class_labels, 'shape', type(class_labels).__name__)}")
        if batch_size and (int(class_labels.min()) < 0 or int(class_labels.max()) > self.null_class):
            raise ValueError(f"class_labels must be in [0, {self.null_class}] ({self.null_class} = null class), "
                             f"got range [{int(class_labels.min())}, {int(class_labels.max())}]")
        return class_labels.to(device=device, dtype=torch.long)

    # ---- teacher-forced pieces (shared by forward and the uncached sampler) ------------------------

    def start_tokens(self, labels: torch.Tensor) -> torch.Tensor:  # [B] -> [B, dim] spatial input at t=0
        return self.class_emb(labels) + self.spatial_pos[0]

    def spatial_forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """codes [B, h*w, D], labels [B] -> normalized spatial outputs [B, h*w, dim] (causal)."""
        summed = self.code_emb(codes[:, :-1]).sum(2)  # [B, h*w-1, dim]: position t-1 feeds position t
        x = torch.cat([self.class_emb(labels)[:, None], summed], dim=1) + self.spatial_pos  # [B, h*w, dim]
        x = self.drop(x)
        for block in self.spatial_blocks:
            x = block(x)
        return self.spatial_norm(x)

    def depth_forward(self, spatial_out: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """spatial_out [N, dim], codes [N, D] -> logits [N, D, K]; step d sees codes < d (causal)."""
        x = torch.cat([spatial_out[:, None], self.code_emb(codes[:, :-1])], dim=1) + self.depth_pos  # [N, D, dim]
        x = self.drop(x)
        for block in self.depth_blocks:
            x = block(x)
        return self.head(self.depth_norm(x))

    def forward(self, codes: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, h, w, D, K] for codes [B, h, w, D]; labels None = null class."""
        self._check_codes(codes)
        B, h, w, D = codes.shape
        codes = codes.long()
        labels = self._labels(class_labels, B, codes.device)
        flat = rearrange(codes, "b h w d -> b (h w) d")
        out = self.spatial_forward(flat, labels)  # [B, h*w, dim]
        logits = self.depth_forward(rearrange(out, "b n c -> (b n) c"), rearrange(flat, "b n d -> (b n) d"))
        return rearrange(logits, "(b h w) d k -> b h w d k", b=B, h=h, w=w)  # [B, h, w, D, K]

    def loss(self, codes: torch.Tensor, class_labels: torch.Tensor | None = None):
        """Mean cross-entropy over all codes, and per-depth accuracy [D] (detached)."""
        return code_loss(self(codes, class_labels), codes)

    # ---- incremental decoding ----------------------------------------------------------------------

    def new_cache(self, batch_size: int, depth: bool = False) -> KVCache:
        """Preallocated cache for the spatial (length h*w) or the depth (length D) transformer."""
        c, p = self.config, self.head.weight
        layers, length = (c.depth_layers, c.code_shape[2]) if depth else (c.spatial_layers, self.spatial_pos.shape[0])
        return KVCache(layers, batch_size, c.heads, length, c.dim // c.heads, device=p.device, dtype=p.dtype)

    def spatial_step(self, x: torch.Tensor, t: int, cache: KVCache) -> torch.Tensor:
        """Spatial input x [B, dim] at position t (cache holds positions < t) -> normalized output [B, dim]."""
        for i, block in enumerate(self.spatial_blocks):
            x = block.step(x, t, cache.kv[i])
        return self.spatial_norm(x)

    def compile_steps(self, **options) -> "RQTransformer":
        """torch.compile the two per-token step functions that sampling runs h*w and h*w*D times.

        Meant for GPUs (e.g. options mode="max-autotune-no-cudagraphs"); on CPU it compiles C++ for about a
        minute and, measured on 2 cores, gives no speed-up. `t`/`d` are dynamic, so one graph serves every
        position. Returns self; sampled codes are the same as without compiling.
        """
        options = {"dynamic": True, **options}
        self.spatial_step = torch.compile(self.spatial_step, **options)
        self.depth_step = torch.compile(self.depth_step, **options)
        return self

    def depth_step(self, x: torch.Tensor, d: int, cache: KVCache) -> torch.Tensor:
        """Depth input x [B, dim] at step d (position embedding included) -> logits [B, K] of code d."""
        for i, block in enumerate(self.depth_blocks):
            x = block.step(x, d, cache.kv[i])
        return self.head(self.depth_norm(x))


# Sizes only: codebook_size, code_shape and the classes come from the RQ-VAE and the data.
PRESETS = {
    "tiny": dict(dim=32, heads=2, spatial_layers=2, depth_layers=1, dropout=0.0),
    # the bundled default: sized to train in about an hour on 2 CPU cores (~3 M parameters)
    "emoji-64": dict(dim=192, heads=3, spatial_layers=4, depth_layers=2, dropout=0.1),
    # the reference configuration of the design notes (~6.6 M parameters with a 512 codebook)
    "reference": dict(dim=256, heads=4, spatial_layers=6, depth_layers=2, dropout=0.0),
}
