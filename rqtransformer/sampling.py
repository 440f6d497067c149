"""Sampling from an RQTransformer: KV-cached spatial steps, D depth steps per position, CFG, completion.

`generate` is attached to the model as `RQTransformer.generate`. The cached path calls the model's
spatial_transformer / depth_transformer one token at a time with KV caches (a text model's prompt is
written into the spatial caches first, in one call); `use_cache=False` re-runs
the teacher-forced forward for every code instead. Both draw random numbers in the same order (one
`draw` per sampled (position, depth)), so for the same generator seed they return the same codes:
a guard on the cache, not a second implementation.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn as nn
from einops import rearrange

from rqcore.checks import is_number, is_whole

from .cpu import packed_weights

GUIDANCE_CUTOFF = 0.0  # generate()'s default guidance_cutoff (see there)
ONE_THREAD_MAX_ROWS = 128  # num_threads="auto": one intra-op thread up to this many rows (see auto_threads)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, K] -> sampled indices [B]: temperature, then top-k, then nucleus (top-p) filtering.

    With a filter, only the k best codes (all K, sorted, for top-p alone) are softmaxed and drawn
    from: the same distribution as masking the rest to -inf, at a fraction of the work for small k.
    Codes tied with the k-th best are kept too (as the official sampler does), so k is a floor.
    """
    if temperature != 1.0:
        logits = logits / temperature
    K = logits.shape[-1]
    if (top_k is None or top_k >= K) and (top_p is None or top_p >= 1.0):
        return draw(logits.softmax(-1), generator).squeeze(-1)
    k = min(top_k or K, K)
    best, index = torch.topk(logits, k, dim=-1)  # [B, k] each, best first
    if k < K:  # ties at the k-th value (finite: -inf rows are excluded anyway) widen the set
        kth = best[:, -1:]  # [B, 1]
        wide = int(((logits >= kth) & (kth > -math.inf)).sum(-1).max())
        if wide > k:
            best, index = torch.topk(logits, wide, dim=-1)
            best = best.masked_fill(best < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        probs = best.softmax(-1)
        best = best.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))  # better codes hold >= top_p
    choice = draw(best.softmax(-1), generator)  # [B, 1] index into the k best
    return index.gather(-1, choice).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs [B, k] -> [B, 1]: what torch.multinomial(probs, 1) computes.

    The same exponential draws and argmax as torch's single-sample path (so the same indices for a
    seed), without its validity checks (reductions and synchronising .item() calls, once per sampled
    code), which a softmax never fails.
    """
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1, keepdim=True)


def per_depth(value, depth: int) -> list:
    """A sampling option given once or per depth (a list of D values, as the official configs do) -> D values."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * depth


def check_filters(model, top_k, top_p) -> None:
    """top_k / top_p: None, one value, or a list of one per depth; k within the codebook, p in (0, 1]."""
    K, D = model.config.codebook_size, model.config.code_shape[2]
    for name, value in (("top_k", top_k), ("top_p", top_p)):
        if isinstance(value, (list, tuple)) and len(value) != D:
            raise ValueError(f"{name} must be one value or a list of one per depth ({D}), got {value!r}")
    if not all(k is None or (is_whole(k) and 1 <= k <= K)
               for k in per_depth(top_k, D)):
        raise ValueError(f"top_k must be None or an integer in [1, {K}] (the codebook size), or a list of one per "
                         f"depth, got {top_k!r}")
    if not all(p is None or (is_number(p) and 0 < p <= 1)
               for p in per_depth(top_p, D)):
        raise ValueError(f"top_p must be None or a number in (0, 1], or a list of one per depth, got {top_p!r}")


def _check_options(model, temperature, top_k, top_p, guidance_scale, guidance_cutoff, callback, num_threads) -> None:
    if not (is_number(temperature) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r} (for greedy decoding use top_k=1)")
    check_filters(model, top_k, top_p)
    if not (is_number(guidance_scale) and 0 <= guidance_scale < float("inf")):
        raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance), got {guidance_scale!r}")
    if not (is_number(guidance_cutoff) and 0 <= guidance_cutoff < 1):
        raise ValueError(f"guidance_cutoff must be a number in [0, 1) (0 = off), got {guidance_cutoff!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable as callback(step, codes_so_far), got {callback!r}")
    if num_threads not in (None, "auto") and not (is_whole(num_threads) and num_threads >= 1):
        raise ValueError(f"num_threads must be 'auto', None (keep torch's setting) or a positive integer, "
                         f"got {num_threads!r}")


def auto_threads(rows: int, use_cache: bool) -> int | None:
    """num_threads="auto": 1 for cached sampling of <= ONE_THREAD_MAX_ROWS rows, else torch's setting.

    Each cached step is a few hundred small ops: splitting them across cores costs more in thread
    wake-ups than it saves, and a spinning second thread stalls whenever another process holds a core.
    Full forwards (the uncached path) do gain from threads. The figures: bench.sampling_speed, docs/performance.md.
    """
    return 1 if use_cache and rows <= ONE_THREAD_MAX_ROWS else None


_threads_lock = threading.Lock()
_threads_users = 0   # generate() calls inside _intra_op_threads right now (any thread)
_threads_saved = 0   # torch's setting before the first of them, restored by the last


@contextmanager
def _intra_op_threads(num_threads: int | None, device: torch.device):
    """Run CPU sampling on `num_threads` intra-op threads, then restore torch's setting.

    torch's setting is partly per thread (OpenMP) and partly global (MKL), so concurrent calls
    remember the setting from before the first of them, and every call restores it on its own
    thread when it ends.
    """
    global _threads_users, _threads_saved
    if num_threads is None or device.type != "cpu":
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
        _threads_users += 1
        saved = _threads_saved
    torch.set_num_threads(min(num_threads, saved))
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
        torch.set_num_threads(saved)


def _parse_prefix(model, prefix):
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


def generate(model, class_labels: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
             num_samples: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             guidance_scale: float = 1.0, guidance_cutoff: float = GUIDANCE_CUTOFF,
             generator: torch.Generator | None = None, use_cache: bool = True,
             prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
             callback: Callable[[int, torch.Tensor], object] | None = None,
             num_threads: int | str | None = "auto") -> torch.Tensor:
    """Sample code stacks `LongTensor [B, h, w, D]`.

    Takes tensors only (names, lists and counts are the pipeline's to check and convert).
    class_labels: None (all rows null class), or an integer tensor [B] of class indices in
    [0, num_classes] (num_classes = the null class). num_samples: the batch size without labels
    (default: the prefix or text batch, or 1); with labels it may only repeat their length.
    text_tokens (text models only): prompt token ids [B or 1, max_text_len] right-padded with
    TEXT_PAD_ID (batch 1 is broadcast); None = the empty prompt.
    top_k=1 is greedy decoding; top_k and top_p may also be lists of one value per depth (as the official
    configs give them). guidance_scale != 1 with labels or text runs conditional rows and
    unconditional rows (null class and empty prompt) in one batch of 2B: logits = uncond + scale * (cond - uncond).
    guidance_cutoff: with guidance_scale > 1, codes whose conditional probability is below this fraction of the
    most likely code's are never drawn (0 = off). Guidance can favour a code the conditional model finds very
    unlikely, only because the unconditional one finds it even less likely; the cutoff keeps them out.
    prefix: (codes [B or 1, h, w, D], keep_mask [B or 1, h, w] bool) forces the codes where keep_mask
    is True; batch 1 is broadcast to B.
    use_cache=False re-runs the teacher-forced forward for every code: slow, the same codes for the
    same generator (a check on the cache).
    callback(step, codes_so_far): called after each position, step = positions done (1..h*w);
    codes_so_far [B, h, w, D] is a copy in which positions not generated yet are -1, except
    forced (prefix) positions, which hold their codes from the start. Its return value is ignored.
    num_threads: torch intra-op threads while sampling on CPU, never more than torch's setting, which
    is restored afterwards. "auto" (default): 1 for cached sampling of up to 128 rows (faster for these
    tiny sequential steps), else torch's setting; None: torch's setting.
    """
    _check_options(model, temperature, top_k, top_p, guidance_scale, guidance_cutoff, callback, num_threads)
    if num_samples is not None and not (is_whole(num_samples) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    rows, text, B, forced, keep = _batch(model, class_labels, text_tokens, num_samples, prefix)
    cfg = (class_labels is not None or text_tokens is not None) and guidance_scale != 1.0
    if cfg:  # [2B]: conditional rows, then unconditional rows (null class, empty prompt)
        rows = torch.cat([rows, torch.full_like(rows, model.null_class)])
        if text is not None:
            text = torch.cat([text, model._text(None, B, model.head.weight.device)])  # [2B, L]
    if num_threads == "auto":
        num_threads = auto_threads(rows.shape[0], use_cache)
    cutoff = math.log(guidance_cutoff) if guidance_cutoff else -math.inf
    # the cached path's steps multiply R rows by every weight: packed once for R (CPU float32, see cpu.py)
    with _eval_mode(model), torch.inference_mode(), _intra_op_threads(num_threads, model.head.weight.device), \
            (packed_weights(model, rows.shape[0]) if use_cache else nullcontext()):
        run = _sample_cached if use_cache else _sample_uncached
        codes = run(model, rows, text, B, cfg, float(guidance_scale), cutoff, float(temperature), top_k, top_p,
                    generator, forced, keep, callback)
    return rearrange(codes, "b (h w) d -> b h w d", h=model.config.code_shape[0])


def _batch(model, class_labels, text_tokens, num_samples, prefix):
    """The checked conditioning -> (labels [B], text [B, L] or None, B, forced codes [B, h*w, D] or None,
    keep [B, h*w] or None): B from the labels, else num_samples, else the prefix or text batch, else 1."""
    forced, keep = _parse_prefix(model, prefix)
    prefix_batch = forced.shape[0] if forced is not None else None
    device = model.head.weight.device
    text = model._text(text_tokens, None, device)  # [Bt, L]; None without text; the empty prompt for None
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
        rows = model._labels(class_labels, B, device)  # dtype and range
    if forced is not None:
        if prefix_batch not in (1, B):
            raise ValueError(f"prefix has batch {prefix_batch} but {B} samples are requested; "
                             "give a prefix with batch 1 or one per sample")
        forced, keep = forced.expand(B, -1, -1), keep.expand(B, -1)
    if text is not None:
        if len(text) not in (1, B):
            raise ValueError(f"text_tokens has batch {len(text)} but {B} samples are requested; "
                             "give one prompt (batch 1) or one per sample")
        text = text.expand(B, -1)
    return rows, text, B, forced, keep


@contextmanager
def _eval_mode(model):
    """No dropout while sampling: only the modules in train mode are switched, and back after, since
    model.eval() / model.train() walk every module twice per call."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _setup(model, B, cfg, scale, cutoff, temperature, top_k, top_p, generator, forced, keep):
    h, w, D = model.config.code_shape
    device = model.head.weight.device
    codes = torch.full((B, h * w, D), -1, dtype=torch.long, device=device)  # -1 = not generated yet
    top_ks, top_ps = per_depth(top_k, D), per_depth(top_p, D)
    if forced is not None:
        codes = torch.where(keep[..., None], forced, codes)
        all_forced = keep.all(0).tolist()  # positions forced in every row skip sampling (same in both paths)
    else:
        all_forced = [False] * (h * w)

    def pick(logits: torch.Tensor, t: int, d: int) -> torch.Tensor:  # logits [R, K] of code (t, d) -> codes [B]
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if cfg:  # uncond + scale * (cond - uncond), among the codes the conditional rows find plausible
            cond = logits[:B]
            logits = torch.lerp(logits[B:], cond, scale)
            if cutoff > -math.inf and scale > 1:  # p_cond(k) < cutoff * max p_cond: never drawn (logit gaps
                # are log-ratios); only when extrapolating, so that scale 0 stays the unconditional model
                logits = logits.masked_fill(cond < cond.amax(-1, keepdim=True) + cutoff, -math.inf)
        code = sample_logits(logits, temperature, top_ks[d], top_ps[d], generator)
        if keep is not None:
            code = torch.where(keep[:, t], forced[:, t, d], code)
        codes[:, t, d] = code
        return code

    def report(callback, t):
        if callback is not None:
            callback(t + 1, rearrange(codes, "b (h w) d -> b h w d", h=h).clone())

    return codes, all_forced, pick, report


def _sample_cached(model, rows, text, B, cfg, scale, cutoff, temperature, top_k, top_p, generator, forced, keep,
                   callback):
    h, w, D = model.config.code_shape
    L = model.config.max_text_len
    codes, all_forced, pick, report = _setup(model, B, cfg, scale, cutoff, temperature, top_k, top_p, generator,
                                             forced, keep)
    R = rows.shape[0]
    spatial_caches, depth_caches = model.new_caches(R), model.new_caches(R, depth=True)
    spatial, depth, code_emb = model.spatial_transformer, model.depth_transformer, model.code_emb
    # the depth input of depth d > 0: code d-1's embedding, or the running sum over codes 0..d-1 (cumsum_depth_emb)
    depth_emb = model.depth_code_emb if model.config.cumsum_depth_emb else None
    first = None  # without a start token: the last prompt token's output, the depth input of position 0
    if text is not None:  # prefill: the prompts' keys and values at positions [0, L), once
        first = _prefill(model, text, spatial_caches)
    start = model.config.start_token
    x = model.start_inputs(rows, text) if start else None  # [R, 1, dim] spatial input of code position 0
    for t in range(h * w):
        # [R, 1, dim]: the depth input of depth 0 (sequence position L + t, or L + t - 1 without a start token)
        y = spatial(x, spatial_caches, L + t - (not start)) if start or t else first
        if not all_forced[t]:
            e = 0  # cumsum_depth_emb: the sum of this position's code embeddings so far
            for d in range(D):
                code = pick(depth(y, depth_caches, d)[:, 0], t, d)  # [B]
                if d + 1 < D:
                    e = code_emb(code) if depth_emb is None else depth_emb(code) + e  # [B, dim]
                    y = e[:, None] if not cfg else e[:, None].repeat(2, 1, 1)  # [R, 1, dim]: both halves, one code
        report(callback, t)
        if t + 1 < h * w:
            x = code_emb(codes[:, t]).sum(1, keepdim=True)  # [B, 1, dim]
            if cfg:
                x = x.repeat(2, 1, 1)
    return codes


def _prefill(model, text: torch.Tensor, caches: nn.ModuleList) -> torch.Tensor:
    """Write the keys and values of the prompts text [R, L] at positions [0, L) of the spatial caches;
    returns the spatial output of the last prompt token [R, 1, dim].

    Rows share few prompts (often one per call, and guidance's unconditional rows all hold the empty
    one), so each distinct prompt runs once and is copied to its rows: at batch 16 a 16-token prefill of
    every row costs as much as the extra attention over those 16 keys in all later steps."""
    unique, index = torch.unique(text, dim=0, return_inverse=True)  # [U, L], [R]
    L = text.shape[1]
    shared = model.new_caches(len(unique))
    out = model.spatial_transformer(model.text_emb(unique), shared, 0)  # [U, L, dim]
    for cache, one in zip(caches, shared):
        cache.kv[:, :, :, :L] = one.kv[index, :, :, :L]  # [R, 2, heads, L, dim_head]
    return out[index, -1:]  # [R, 1, dim]


def _sample_uncached(model, rows, text, B, cfg, scale, cutoff, temperature, top_k, top_p, generator, forced, keep,
                     callback):
    """The check on the cache: re-run the teacher-forced forward for every code (same draws, same order)."""
    h, w, D = model.config.code_shape
    codes, all_forced, pick, report = _setup(model, B, cfg, scale, cutoff, temperature, top_k, top_p, generator,
                                             forced, keep)
    reps = 2 if cfg else 1
    for t in range(h * w):
        if not all_forced[t]:
            for d in range(D):
                current = codes.clamp(min=0).repeat(reps, 1, 1)  # [R, h*w, D]; later codes do not matter
                logits = model(rearrange(current, "r (h w) d -> r h w d", h=h), rows, text)  # [R, h, w, D, K]
                pick(logits[:, t // w, t % w, d], t, d)
        report(callback, t)
    return codes
