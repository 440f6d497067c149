"""Stage 2: the RQ-Transformer prior over residual code stacks [B, h, w, D], optionally text-conditioned."""
from .model import TEXT_PAD_ID, KVCache, RQTransformer, RQTransformerConfig
from .options import Conditioning, SamplingOptions
from .sampling import generate, sample_logits

__all__ = ["RQTransformer", "RQTransformerConfig", "KVCache", "Conditioning", "SamplingOptions", "generate",
           "sample_logits", "TEXT_PAD_ID", "PromptTokenizer"]


def __getattr__(name):
    # lazily: the tokenizer needs the `tokenizers` package, which models without text never import
    if name == "PromptTokenizer":
        from .tokenizer import PromptTokenizer
        return PromptTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
