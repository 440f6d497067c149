"""RQ-Transformer: an autoregressive prior over residual code stacks `codes [B, h, w, D]`.

A *spatial* transformer runs causally over the h*w positions (row-major). Its input at position t is
the sum of the D code embeddings of position t-1 plus a spatial position embedding; position 0 gets a
start token carrying the class embedding. A *depth* transformer then predicts the D codes of each
position one after another: its input is [spatial_out_t, emb(code_t,0), ..., emb(code_t,D-2)] plus a
depth position embedding, and its output at depth d gives the logits of code d.

One forward serves training and sampling (as in gpt-fast): `spatial_transformer(x, caches, pos)` and
`depth_transformer(x, caches, pos)` take the inputs of positions [pos, pos+n). Training calls them on
whole sequences without caches (causal attention); the sampler calls them one token at a time with a
`KVCache` module per layer (from `new_caches`), into which each attention layer writes its keys and
values at `pos` before attending over positions [0, pos+n). Cached and teacher-forced logits therefore
come from the same code; the uncached sampler (re-running `forward` per code) is kept as a guard. One
cached token in eval mode (every sampling step) runs each layer as `Block.step`: the same math on [B, dim]
in fewer Python calls and tensor ops, because on CPU those calls cost as much as the arithmetic.

Class index `num_classes` is the learned "null" class (unconditional / classifier-free guidance).

Text conditioning (config text_vocab_size, max_text_len = L > 0): L prompt tokens, right-padded with
TEXT_PAD_ID (all pads = the empty prompt), prefix the spatial sequence, which becomes
[text tokens 0..L-1] + [start token, codes of positions 0..h*w-2]; the last h*w outputs feed the depth
transformer. The sampler writes the prompt into the spatial KV caches once, then steps as without text.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from rqcore.checks import is_number, is_whole
from rqcore.hub_transfer import resolve_folder
from rqcore.pretrained import PretrainedMixin

from .blocks import SHORT_SEQUENCE, Block, KVCache, causal_attention  # noqa: F401 (re-exported)
from .cpu import linear
from .cpu_weights import quantized_copy
from .options import conditioning as _conditioning
from .sampling import generate_one as _generate

TEXT_PAD_ID = 0  # pads prompts to max_text_len (rqtransformer.tokenizer uses the same id)
TOKENIZER_NAME = "tokenizer.json"  # beside config.json in the folders of text models


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
    text_vocab_size: int = 0            # the prompt tokenizer's vocabulary; 0 = no text conditioning
    max_text_len: int = 0               # prompt tokens prefixing the codes (padded/truncated to it); 0 = no text
    # the official (kakaobrain) layout, for converted checkpoints; the defaults are this project's own
    cumsum_depth_emb: bool = False      # depth input d > 0: the summed embeddings of codes 0..d-1 from a table of
                                        # its own (depth_code_emb); else code_emb of code d-1
    spatial_norm: bool = True           # a LayerNorm after the spatial transformer
    start_token: bool = True            # False (text models): no start token, the last prompt token predicts code 0
    text_pool: bool = False             # text models: the prompt's token embeddings, pooled (sum / sqrt(count)), are
                                        # added to the start token as a class embedding is (a direct path, besides
                                        # the attention prefix)

    def __post_init__(self):
        if not isinstance(self.code_shape, (list, tuple)) or len(self.code_shape) != 3:
            raise ValueError(f"code_shape must be 3 positive integers (h, w, D), got {self.code_shape!r}")
        self.code_shape = tuple(self.code_shape)
        if not all(is_whole(value) and value >= 1 for value in self.code_shape):
            raise ValueError(f"code_shape must be 3 positive integers (h, w, D), got {self.code_shape!r}")
        self.code_shape = tuple(map(int, self.code_shape))  # numpy integers too: config.json needs plain ints
        for name in ("codebook_size", "dim", "heads", "spatial_layers", "depth_layers", "mlp_ratio"):
            value = getattr(self, name)
            if not (is_whole(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if not (is_whole(self.num_classes) and self.num_classes >= 0):
            raise ValueError(f"num_classes must be an integer >= 0 (0 = unconditional), got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.class_names = list(self.class_names)
        if not all(isinstance(n, str) for n in self.class_names):
            raise ValueError(f"class_names must be strings, got {self.class_names!r}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries but num_classes is "
                             f"{self.num_classes}; give one name per class or none")
        for name in ("text_vocab_size", "max_text_len"):
            value = getattr(self, name)
            if not (is_whole(value) and value >= 0):
                raise ValueError(f"{name} must be an integer >= 0 (0 = no text conditioning), got {value!r}")
            setattr(self, name, int(value))
        if (self.text_vocab_size > 0) != (self.max_text_len > 0):
            raise ValueError(f"text_vocab_size ({self.text_vocab_size}) and max_text_len ({self.max_text_len}) "
                             "must both be 0 (no text) or both positive")
        if self.text_pool and (not self.max_text_len or not self.start_token):
            raise ValueError("text_pool needs a text model with a start token (max_text_len > 0, start_token true)")
        if not self.start_token and (not self.max_text_len or self.num_classes):
            raise ValueError("start_token=False needs a text model without classes (the prompt's last token "
                             "then predicts the first code)")


class RQTransformer(PretrainedMixin, nn.Module):
    config_class = RQTransformerConfig
    meta_init = True  # from_pretrained: no random init of weights about to be replaced (paper sizes: GBs)

    def __init__(self, config: RQTransformerConfig):
        super().__init__()
        self.config = c = config
        h, w, D = c.code_shape
        self.code_emb = nn.Embedding(c.codebook_size, c.dim)
        if c.cumsum_depth_emb:
            self.depth_code_emb = nn.Embedding(c.codebook_size, c.dim)
        if c.start_token:
            self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)  # last row = null class / start token
        # by the position of the input: the start token, then codes 0..h*w-2 (the last code is never an input)
        self.spatial_pos = nn.Parameter(torch.zeros(h * w - (not c.start_token), c.dim))
        self.depth_pos = nn.Parameter(torch.zeros(D, c.dim))
        if c.max_text_len:  # text tensors in text models only: loading is strict, so files without them load
            self.text_emb = nn.Embedding(c.text_vocab_size, c.dim)  # row TEXT_PAD_ID: the pad token
            self.text_pos = nn.Parameter(torch.zeros(c.max_text_len, c.dim))
        self.tokenizer = None  # a PromptTokenizer for text models: set by training, saved and loaded with the model
        self.drop = nn.Dropout(c.dropout)
        self.spatial_blocks = nn.ModuleList(Block(c) for _ in range(c.spatial_layers))
        self.spatial_norm = nn.LayerNorm(c.dim) if c.spatial_norm else nn.Identity()
        self.depth_blocks = nn.ModuleList(Block(c) for _ in range(c.depth_layers))
        self.depth_norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.spatial_pos, std=0.02)
        nn.init.normal_(self.depth_pos, std=0.02)
        if c.max_text_len:
            nn.init.normal_(self.text_pos, std=0.02)
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

    generate, conditioning = _generate, _conditioning  # sampling.generate_one, options.conditioning

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return self.config.code_shape

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def has_text(self) -> bool:
        """Whether the model is conditioned on text prompts (max_text_len > 0)."""
        return self.config.max_text_len > 0

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

    def checked_labels(self, class_labels, batch_size: int, device) -> torch.Tensor:
        """Validated labels [B] in [0, num_classes] (num_classes = null); None = null for all rows."""
        if class_labels is None:
            return torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype.is_floating_point \
                or class_labels.dtype == torch.bool or class_labels.shape != (batch_size,):
            got = (f"{class_labels.dtype} of shape {list(class_labels.shape)}" if isinstance(class_labels, torch.Tensor)
                   else type(class_labels).__name__)
            raise ValueError(f"class_labels must be an integer tensor of shape [{batch_size}], got {got}")
        if batch_size and (int(class_labels.min()) < 0 or int(class_labels.max()) > self.null_class):
            raise ValueError(f"class_labels must be in [0, {self.null_class}] ({self.null_class} = null class), "
                             f"got range [{int(class_labels.min())}, {int(class_labels.max())}]")
        return class_labels.to(device=device, dtype=torch.long)

    def checked_text(self, text_tokens, batch_size: int | None, device) -> torch.Tensor | None:
        """Validated prompt tokens [B, L] (None = the empty prompt; batch_size None: any batch >= 1);
        None for a model without text."""
        c = self.config
        if not c.max_text_len:
            if text_tokens is not None:
                raise ValueError("this model has no text conditioning (text_vocab_size = 0): pass text_tokens=None")
            return None
        L = c.max_text_len
        if text_tokens is None:
            return torch.full((batch_size or 1, L), TEXT_PAD_ID, dtype=torch.long, device=device)
        want = f"[{batch_size if batch_size else 'B'}, {L}]"
        if not isinstance(text_tokens, torch.Tensor) or text_tokens.dtype.is_floating_point \
                or text_tokens.dtype.is_complex or text_tokens.dtype == torch.bool:
            got = getattr(text_tokens, "dtype", type(text_tokens).__name__)
            raise ValueError(f"text_tokens must be an integer tensor {want} of token ids from the model's tokenizer, "
                             f"got {got}")
        if text_tokens.ndim != 2 or text_tokens.shape[1] != L or not len(text_tokens) \
                or (batch_size is not None and len(text_tokens) != batch_size):
            raise ValueError(f"text_tokens must have shape {want} (max_text_len {L}, right-padded with "
                             f"TEXT_PAD_ID {TEXT_PAD_ID}), got {list(text_tokens.shape)}")
        lo, hi = int(text_tokens.min()), int(text_tokens.max())
        if lo < 0 or hi >= c.text_vocab_size:
            raise ValueError(f"text token ids must be in [0, {c.text_vocab_size}) (text_vocab_size), "
                             f"got range [{lo}, {hi}]")
        return text_tokens.to(device=device, dtype=torch.long)

    def start_inputs(self, labels: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        """The spatial input of code position 0 [B, 1, dim]: the class embedding (the null class without one),
        plus with text_pool the prompt's non-pad token embeddings pooled (zero for the empty prompt)."""
        x = self.class_emb(labels)[:, None]  # [B, 1, dim]
        if self.config.text_pool and text is not None:
            real = (text != TEXT_PAD_ID).unsqueeze(-1).to(x.dtype)  # [B, L, 1]
            # the sum over real tokens / sqrt(count): does not grow with the prompt's length (bench.text_vs_class
            # compares it with the mean, the plain sum and an attention pooling)
            pooled = (self.text_emb(text) * real).sum(1) / real.sum(1).clamp(min=1).sqrt()  # [B, dim]
            x = x + pooled[:, None]
        return x

    # ---- the two transformers: one forward for training and for cached sampling ----------------------

    def new_caches(self, batch_size: int, depth: bool = False) -> nn.ModuleList:
        """One KVCache per layer of the spatial (length max_text_len + h*w) or the depth (length D) transformer."""
        c, p = self.config, self.head.weight
        layers, length = ((c.depth_layers, c.code_shape[2]) if depth
                          else (c.spatial_layers, c.max_text_len + self.spatial_pos.shape[0]))
        return nn.ModuleList(KVCache(batch_size, c.heads, length, c.dim // c.heads, device=p.device, dtype=p.dtype)
                             for _ in range(layers))

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, caches, pos: int) -> torch.Tensor:
        if caches is not None and x.shape[1] == 1 and not self.training:  # the sampler's per-token path
            x = x[:, 0]  # [B, dim]
            for block, cache in zip(blocks, caches):
                x = block.step(x, cache.kv, pos)
            return x[:, None]
        for block, cache in zip(blocks, caches if caches is not None else [None] * len(blocks)):
            x = block(x, cache, pos)
        return x

    def spatial_transformer(self, x: torch.Tensor, caches: nn.ModuleList | None = None, pos: int = 0) -> torch.Tensor:
        """Spatial inputs x [B, n, dim] of sequence positions [pos, pos+n) -> normalized outputs [B, n, dim].

        The sequence is the L = max_text_len text embeddings (none without text), then the h*w code
        positions: the input of code position t is the class embedding (t = 0) or the summed code embeddings
        of position t-1. Without a start token (start_token=False) the code inputs begin with position 0's
        codes and the last text token's output predicts code 0. Position embeddings are added here. Causal;
        with caches (new_caches) earlier positions come from them.
        """
        L = self.config.max_text_len
        if pos >= L:  # code positions only: every sampling step
            x = x + self.spatial_pos[pos - L : pos - L + x.shape[1]]
        else:
            x = x + torch.cat([self.text_pos, self.spatial_pos])[pos : pos + x.shape[1]]
        x = self.drop(x) if self.training else x
        return self.spatial_norm(self._blocks(self.spatial_blocks, x, caches, pos))

    def depth_transformer(self, x: torch.Tensor, caches: nn.ModuleList | None = None, pos: int = 0) -> torch.Tensor:
        """Depth inputs x [N, n, dim] of depths [pos, pos+n) -> logits [N, n, K]; output d predicts code d.

        The input of depth 0 is the spatial output, of depth d > 0 the embedding of code d-1 (cumsum_depth_emb:
        the sum of depth_code_emb over codes 0..d-1). Causal, as above.
        """
        x = x + self.depth_pos[pos : pos + x.shape[1]]
        x = self.drop(x) if self.training else x
        return linear(self.head, self.depth_norm(self._blocks(self.depth_blocks, x, caches, pos)))

    def forward(self, codes: torch.Tensor, class_labels: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, h, w, D, K] for codes [B, h, w, D]; labels None = null class;
        text_tokens [B, max_text_len] (text models only; None = the empty prompt)."""
        self._check_codes(codes)
        B, h, w, D = codes.shape
        labels = self.checked_labels(class_labels, B, codes.device)
        text = self.checked_text(text_tokens, B, codes.device)  # [B, L] or None
        flat = rearrange(codes.long(), "b h w d -> b (h w) d")
        # spatial input of position t: the class (t = 0), else the summed code embeddings of position t-1
        x = self.code_emb(flat[:, :-1]).sum(2)  # [B, h*w-1, dim]
        if self.config.start_token:
            x = torch.cat([self.start_inputs(labels, text), x], dim=1)  # [B, h*w, dim]
        if text is not None:
            # How text attends: causally, like the codes after it (as in DALL-E's transformer). Every code
            # position sees the whole prompt either way; a causal prefix lets one lower-triangular mask serve
            # training (all L + h*w tokens) and the sampler's prefill (the L text tokens from position 0), and
            # each sampling step attends over the filled cache with no mask at all. A bidirectional prefix
            # would need an explicit prefix-LM mask in both, for little gain on short prompts. Pads are
            # ordinary tokens (pad embedding + text position, like DALL-E's per-position pads): real tokens
            # never see them, and all pads is the empty prompt that caption dropout trains for guidance.
            x = torch.cat([self.text_emb(text), x], dim=1)  # [B, L + h*w (- 1 without start token), dim]
        out = self.spatial_transformer(x)[:, x.shape[1] - h * w:]  # [B, h*w, dim]: the outputs predicting codes
        out = rearrange(out, "b n c -> (b n) 1 c")  # [B*h*w, 1, dim]
        # depth input of depth d: the spatial output (d = 0), else the embedding of code d-1 (or of codes 0..d-1)
        prev = rearrange(flat[..., :-1], "b n d -> (b n) d")  # [B*h*w, D-1]
        emb = self.depth_code_emb(prev).cumsum(1) if self.config.cumsum_depth_emb else self.code_emb(prev)
        y = torch.cat([out, emb], dim=1)  # [B*h*w, D, dim]
        logits = self.depth_transformer(y)  # [B*h*w, D, K]
        return rearrange(logits, "(b h w) d k -> b h w d k", b=B, h=h, w=w)

    def compile_steps(self, **options) -> "RQTransformer":
        """torch.compile spatial_transformer and depth_transformer, which sampling calls h*w and h*w*D times.

        Meant for GPUs (e.g. options mode="max-autotune-no-cudagraphs"); on CPU it compiles C++ for about a
        minute for no speed-up. `pos` is dynamic, so one graph serves every
        position after the first. forward() then runs the compiled functions too. Returns self; sampled
        codes are the same as without compiling.
        """
        options = {"dynamic": True, **options}
        if self.head.weight.device.type == "cpu" and not {"mode", "options"} & options.keys():
            # inductor's vectorized C++ for dynamic shapes writes garbage into the KV caches at one thread with
            # AVX2 kernels (torch 2.14; the app samples small batches at one thread): scalar C++ is right
            options["options"] = {"cpp.simdlen": 0}
        self.spatial_transformer = torch.compile(self.spatial_transformer, **options)
        self.depth_transformer = torch.compile(self.depth_transformer, **options)
        return self

    def quantized_for_cpu(self, weights: str = "float16", inplace: bool = False) -> "RQTransformer":
        """A copy for faster sampling on CPU whose linear layers multiply by "float16", "int8" or "int4" weights
        (rqtransformer.cpu_weights; bench.precision gives their speed and fidelity). float16 weights loaded from
        a float16 file (the bundled model's) lose nothing: the same codes for the same seed; other weights are
        rounded, so samples can drift from this model's. Same float32 parameters and state_dict (autograd uses
        them); ValueError where the CPU lacks the kernels. inplace: convert this model instead of a copy (what
        RQPipeline.from_pretrained does: no second copy at load)."""
        return quantized_copy(self, weights, inplace)

    # ---- save / load: the tokenizer travels with a text model ------------------------------------------

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors, and for a text model tokenizer.json from `self.tokenizer`."""
        if self.has_text:  # refuse before writing anything: a text model without its tokenizer is unusable
            if self.tokenizer is None:
                raise ValueError("this text model has no tokenizer: set model.tokenizer (a PromptTokenizer "
                                 "trained on the captions) before save_pretrained")
            if self.tokenizer.vocab_size != self.config.text_vocab_size:
                raise ValueError(f"model.tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                                 f"text_vocab_size is {self.config.text_vocab_size}")
        super().save_pretrained(path, dtype)
        if self.has_text:
            self.tokenizer.save(Path(path) / TOKENIZER_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, **hub):
        """Load a model saved by save_pretrained; a text model strictly needs its tokenizer.json (models
        without text ignore one). `hub`: revision, local_files_only, ... for a Hub repo id (PretrainedMixin)."""
        path = resolve_folder(path, **hub)  # a local folder from here on
        model = super().from_pretrained(path, device=device, dtype=dtype)
        if model.has_text:
            file = Path(path) / TOKENIZER_NAME
            if not file.is_file():
                raise ValueError(f"{path} holds a text-conditioned model but no {TOKENIZER_NAME}; "
                                 "save it with model.tokenizer set")
            from .tokenizer import PromptTokenizer  # only text models need the tokenizers package

            tokenizer = PromptTokenizer.from_file(file)
            if tokenizer.vocab_size != model.config.text_vocab_size:
                raise ValueError(f"{file} has {tokenizer.vocab_size} tokens but config.json's text_vocab_size "
                                 f"is {model.config.text_vocab_size}: the tokenizer belongs to another model")
            model.tokenizer = tokenizer
        return model


# Sizes only: codebook_size, code_shape and the classes come from the RQ-VAE and the data.
PRESETS = {
    "tiny": dict(dim=32, heads=2, spatial_layers=2, depth_layers=1, dropout=0.0),
    # the bundled default: sized to train in about an hour on 2 CPU cores (~3 M parameters)
    "emoji-64": dict(dim=192, heads=3, spatial_layers=4, depth_layers=2, dropout=0.1),
    # the larger stage 2 (~13 M parameters): within the app's budget of 1 s for 4 images on 2 cores
    "emoji-64-v7": dict(dim=320, heads=5, spatial_layers=8, depth_layers=2, dropout=0.1),
    # the reference configuration of the design notes (~6.6 M parameters with a 512 codebook)
    "reference": dict(dim=256, heads=4, spatial_layers=6, depth_layers=2, dropout=0.0),
    # the paper's models for 8x8x4 codes at 256 px, as its official configs (FFHQ 350M; ImageNet 480M, 821M,
    # 1.4B, 3.8B), residual dropout 0.1; counts differ a little: ours learns its own code embeddings and head
    "paper-350m": dict(dim=1024, heads=16, spatial_layers=24, depth_layers=4, dropout=0.1),
    "paper-480m": dict(dim=1536, heads=24, spatial_layers=12, depth_layers=4, dropout=0.1),
    "paper-821m": dict(dim=1536, heads=24, spatial_layers=24, depth_layers=4, dropout=0.1),
    "paper-1.4b": dict(dim=1536, heads=24, spatial_layers=42, depth_layers=6, dropout=0.1),
    "paper-3.8b": dict(dim=2560, heads=40, spatial_layers=42, depth_layers=6, dropout=0.1),
}
