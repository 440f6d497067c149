"""Stage 2: the RQ-Transformer prior over residual code stacks [B, h, w, D]."""
from .model import KVCache, RQTransformer, RQTransformerConfig
from .sampling import generate, sample_logits

__all__ = ["RQTransformer", "RQTransformerConfig", "KVCache", "generate", "sample_logits"]
