"""What a sampling call is given: per request, its options (`SamplingOptions`) and its rows' conditioning
(`Conditioning`: class labels and prompt tokens of a whole batch, cut into requests). A batch may hold many
requests, each with its own options and random generator (see sampling.generate)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

from rqcore.checks import is_number, is_whole

GUIDANCE_CUTOFF = 0.0  # the default guidance_cutoff (see SamplingOptions)


def per_depth(value, depth: int) -> list:
    """A sampling option given once or per depth (a list of D values, as the official configs do) -> D values."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * depth


@dataclass(frozen=True)
class SamplingOptions:
    """One request's sampling settings, checked here once (the model-dependent bounds: `check_for`).

    temperature > 0; top_k (k best codes, ties kept; 1 = greedy) and top_p (nucleus) None, one value, or a
    list of one per depth; guidance_scale: 1 = off, else logits = uncond + scale * (cond - uncond);
    guidance_cutoff: with guidance_scale > 1, codes whose conditional probability is below this fraction of
    the most likely code's are never drawn (0 = off): guidance can favour a code the conditional model finds
    very unlikely, only because the unconditional one finds it even less likely.
    """
    temperature: float = 1.0
    top_k: int | tuple[int | None, ...] | None = None
    top_p: float | tuple[float | None, ...] | None = None
    guidance_scale: float = 1.0
    guidance_cutoff: float = GUIDANCE_CUTOFF

    def __post_init__(self):
        if not (is_number(self.temperature) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r} "
                             "(for greedy decoding use top_k=1)")
        for name, ok, rule in (("top_k", lambda k: is_whole(k) and k >= 1, "an integer >= 1"),
                               ("top_p", lambda p: is_number(p) and 0 < p <= 1, "a number in (0, 1]")):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, value := tuple(value))  # hashable, and never changed under us
            if not all(v is None or ok(v) for v in (value if isinstance(value, tuple) else [value])):
                raise ValueError(f"{name} must be None or {rule}, or a list of one per depth, got {value!r}")
        if not (is_number(self.guidance_scale) and 0 <= self.guidance_scale < float("inf")):
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance), got {self.guidance_scale!r}")
        if not (is_number(self.guidance_cutoff) and 0 <= self.guidance_cutoff < 1):
            raise ValueError(f"guidance_cutoff must be a number in [0, 1) (0 = off), got {self.guidance_cutoff!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1

    def check_for(self, model) -> None:
        """The bounds that depend on the model: per-depth lists of D values, k within the codebook."""
        check_filters(model, self.top_k, self.top_p)

    def filters(self, depth: int) -> list[tuple]:
        """[(top_k, top_p)] for each of `depth` depths."""
        return list(zip(per_depth(self.top_k, depth), per_depth(self.top_p, depth)))


def check_filters(model, top_k, top_p) -> None:
    """top_k / top_p: None, one value, or a list of one per depth; k within the codebook, p in (0, 1]."""
    K, D = model.config.codebook_size, model.config.code_shape[2]
    for name, value in (("top_k", top_k), ("top_p", top_p)):
        if isinstance(value, (list, tuple)) and len(value) != D:
            raise ValueError(f"{name} must be one value or a list of one per depth ({D}), got {value!r}")
    if not all(k is None or (is_whole(k) and 1 <= k <= K) for k in per_depth(top_k, D)):
        raise ValueError(f"top_k must be None or an integer in [1, {K}] (the codebook size), or a list of one per "
                         f"depth, got {top_k!r}")
    if not all(p is None or (is_number(p) and 0 < p <= 1) for p in per_depth(top_p, D)):
        raise ValueError(f"top_p must be None or a number in (0, 1], or a list of one per depth, got {top_p!r}")


@dataclass
class Conditioning:
    """The rows of a batch: class labels [B] (the model's null class = none), prompt tokens [B, L] (text models;
    TEXT_PAD_ID rows = the empty prompt) and `requests`, the row count of each request, in order (default:
    one request of all B rows). Build it with `RQTransformer.conditioning`, which checks the tensors."""
    labels: torch.Tensor
    text: torch.Tensor | None = None
    requests: tuple[int, ...] = field(default=())

    def __post_init__(self):
        B = len(self.labels)
        self.requests = tuple(self.requests) or (B,)
        if not all(is_whole(n) and n >= 1 for n in self.requests) or sum(self.requests) != B:
            raise ValueError(f"requests must be positive row counts that add up to the batch ({B}), "
                             f"got {self.requests!r}")
        if self.text is not None and len(self.text) != B:
            raise ValueError(f"text has {len(self.text)} rows, the labels {B}")

    @property
    def batch_size(self) -> int:
        return len(self.labels)

    def slices(self) -> list[slice]:
        """Each request's rows."""
        out, start = [], 0
        for n in self.requests:
            out.append(slice(start, start + n))
            start += n
        return out

    @classmethod
    def concat(cls, parts: list["Conditioning"]) -> "Conditioning":
        """One batch of several requests' conditionings (all of one model: text in all or none)."""
        texts = [p.text for p in parts]
        if any(t is None for t in texts) and not all(t is None for t in texts):
            raise ValueError("all requests of a batch must have text, or none")
        return cls(torch.cat([p.labels for p in parts]), None if texts[0] is None else torch.cat(texts),
                   tuple(n for p in parts for n in p.requests))


def conditioning(model, class_labels: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                 num_samples: int | None = None, prefix_batch: int | None = None) -> Conditioning:
    """RQTransformer.conditioning: one request's rows from tensors, checked. class_labels: None (all rows the
    null class) or an integer tensor [B] in [0, num_classes]; text_tokens (text models): [B or 1, L] token ids
    (batch 1 is broadcast), None = the empty prompt. B: the labels' length, else num_samples, else the
    prefix's or the prompts' batch, else 1."""
    if num_samples is not None and not (is_whole(num_samples) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    device = model.head.weight.device
    text = model.checked_text(text_tokens, None, device)  # [Bt, L]; None without text; the empty prompt for None
    text_batch = len(text) if text_tokens is not None else None
    if class_labels is None:
        B = num_samples or max(prefix_batch or 1, text_batch or 1)
        rows = torch.full((B,), model.null_class, dtype=torch.long, device=device)
    else:
        if not isinstance(class_labels, torch.Tensor) or class_labels.ndim != 1 or not len(class_labels):
            got = (f"shape {list(class_labels.shape)}" if isinstance(class_labels, torch.Tensor)
                   else type(class_labels).__name__)
            raise ValueError(f"class_labels must be None or a non-empty integer tensor [B] of class indices, got {got}")
        B = len(class_labels)
        if num_samples is not None and num_samples != B:
            raise ValueError(f"num_samples={num_samples} does not match the {B} class labels given; "
                             "leave num_samples=None with labels")
        rows = model.checked_labels(class_labels, B, device)  # dtype and range
    if text is not None:
        if len(text) not in (1, B):
            raise ValueError(f"text_tokens has batch {len(text)} but {B} samples are requested; "
                             "give one prompt (batch 1) or one per sample")
        text = text.expand(B, -1)
    return Conditioning(rows, text)


def parse_prefix(model, prefix):
    """prefix (codes [Bp, h, w, D], keep [Bp, h, w]) -> (codes [Bp, h*w, D] long, keep [Bp, h*w] bool) on the
    model's device, or (None, None)."""
    if prefix is None:
        return None, None
    h, w, D = model.config.code_shape
    K = model.config.codebook_size
    if not isinstance(prefix, tuple) or len(prefix) != 2:
        raise ValueError(f"prefix must be a tuple (codes [B, {h}, {w}, {D}], keep_mask [B, {h}, {w}] bool), "
                         f"got {type(prefix).__name__}" + (f" of {len(prefix)}" if isinstance(prefix, tuple) else ""))
    codes, keep = prefix
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise ValueError(f"keep_mask must be a bool tensor [B, {h}, {w}] (True = keep the given code)")
    if keep.ndim != 3 or tuple(keep.shape[1:]) != (h, w) or not len(keep):
        raise ValueError(f"keep_mask must have shape [B, {h}, {w}], got {list(keep.shape)}")
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"prefix codes must be an integer tensor [B, {h}, {w}, {D}]")
    if codes.ndim != 4 or tuple(codes.shape[1:]) != (h, w, D) or not len(codes):
        raise ValueError(f"prefix codes must have shape [B, {h}, {w}, {D}], got {list(codes.shape)}")
    if codes.shape[0] != keep.shape[0] and 1 not in (codes.shape[0], keep.shape[0]):
        raise ValueError(f"prefix codes batch ({codes.shape[0]}) and keep_mask batch ({keep.shape[0]}) differ")
    device = model.head.weight.device
    bp = max(codes.shape[0], keep.shape[0])
    keep = rearrange(keep.to(device), "b h w -> b (h w)").expand(bp, -1)
    codes = rearrange(codes.to(device=device, dtype=torch.long), "b h w d -> b (h w) d").expand(bp, -1, -1)
    kept = codes[keep]  # [M, D] only the forced stacks must be valid codes
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= K):
        raise ValueError(f"prefix code values must be in [0, {K}), got range [{int(kept.min())}, {int(kept.max())}]")
    return codes.masked_fill(~keep[..., None], 0), keep
