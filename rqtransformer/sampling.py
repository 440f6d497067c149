"""Sampling from an RQTransformer: a batch of one or more requests, each with its own options and random
generator; KV-cached spatial steps (a prefill, then one step per position), D depth steps per position, CFG,
completion.

`generate(model, conditioning, options, generators)` is the core; `RQTransformer.generate(class_labels=...)`
(`generate_one`) is one request from tensors. The cached path calls the model's spatial_transformer /
depth_transformer one token at a time with KV caches (a text model's prompts are written into the spatial
caches first, in one call); `use_cache=False` re-runs the teacher-forced forward for every code instead. Both
draw random numbers in the same order (one draw per request and sampled (position, depth)), so for the same
generators they return the same codes: a guard on the cache, not a second implementation.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
from einops import rearrange

from rqcore.checks import is_whole

from .cpu import packed_weights
from .options import GUIDANCE_CUTOFF, Conditioning, SamplingOptions, parse_prefix

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


def auto_threads(rows: int, use_cache: bool) -> int | None:
    """num_threads="auto": 1 for cached sampling of <= ONE_THREAD_MAX_ROWS rows, else torch's setting.

    Each cached step is a few hundred small ops: splitting them across cores costs more in thread
    wake-ups than it saves, and a spinning second thread stalls whenever another process holds a core.
    Full forwards (the uncached path) do gain from threads. The figures: bench.sampling_speed, docs/performance.md.
    """
    return 1 if use_cache and rows <= ONE_THREAD_MAX_ROWS else None


_threads_lock = threading.Lock()
_threads_users = 0   # generate() calls inside intra_op_threads right now (any thread)
_threads_saved = 0   # torch's setting before the first of them, restored by the last


@contextmanager
def intra_op_threads(num_threads: int | None, device: torch.device):
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


@dataclass
class _Plan:
    """A checked batch: rows [R] (R = B, or 2B under guidance: the conditional rows, then unconditional ones),
    each request's rows, options, filters per depth and generator, and the forced (prefix) codes."""
    rows: torch.Tensor
    text: torch.Tensor | None
    B: int
    slices: list[slice]
    options: list[SamplingOptions]
    filters: list[list[tuple]]
    generators: list[torch.Generator | None]
    forced: torch.Tensor | None  # [B, h*w, D]
    keep: torch.Tensor | None  # [B, h*w] bool
    guided: bool


def _per_request(value, n: int, what: str, ok) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or not all(ok(v) for v in values):
        raise ValueError(f"{what} must be one, or a list of one per request ({n}), got {value!r}")
    return values


def _plan(model, conditioning: Conditioning, options, generators, prefix) -> _Plan:
    if not isinstance(conditioning, Conditioning):
        raise ValueError(f"conditioning must be a Conditioning, got {type(conditioning).__name__}")
    device, n = model.head.weight.device, len(conditioning.requests)
    options = _per_request(options, n, "options", lambda o: isinstance(o, SamplingOptions))
    for o in options:
        o.check_for(model)
    generators = _per_request(generators, n, "generator", lambda g: g is None or isinstance(g, torch.Generator))
    B = conditioning.batch_size
    rows = model.checked_labels(conditioning.labels, B, device)  # [B]
    text = model.checked_text(conditioning.text, B, device)  # [B, L] (None: the empty prompt); None without text
    forced, keep = parse_prefix(model, prefix)
    if forced is not None:
        if forced.shape[0] not in (1, B):
            raise ValueError(f"prefix has batch {forced.shape[0]} but {B} samples are requested; "
                             "give a prefix with batch 1 or one per sample")
        forced, keep = forced.expand(B, -1, -1), keep.expand(B, -1)
    guided = any(o.guided for o in options)
    if guided:  # [2B]: conditional rows, then unconditional rows (null class, empty prompt)
        rows = torch.cat([rows, torch.full_like(rows, model.null_class)])
        if text is not None:
            text = torch.cat([text, model.checked_text(None, B, device)])  # [2B, L]
    D = model.config.code_shape[2]
    return _Plan(rows, text, B, conditioning.slices(), options, [o.filters(D) for o in options], generators,
                 forced, keep, guided)


def generate(model, conditioning: Conditioning, options: SamplingOptions | list[SamplingOptions] = SamplingOptions(),
             generators: torch.Generator | list[torch.Generator | None] | None = None,
             prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
             callback: Callable[[int, torch.Tensor], object] | None = None, *, use_cache: bool = True,
             num_threads: int | str | None = "auto") -> torch.Tensor:
    """Sample code stacks `LongTensor [B, h, w, D]` for a batch of one or more requests.

    conditioning: the rows' labels and prompts and the requests' row counts (RQTransformer.conditioning).
    options, generators: one for all requests, or one per request. Each request draws its random numbers
    from its own generator, so its codes do not depend on what else shares the batch.
    prefix: (codes [B or 1, h, w, D], keep_mask [B or 1, h, w] bool) forces the codes where keep_mask is
    True. callback(step, codes_so_far): after each position, step = positions done (1..h*w);
    codes_so_far [B, h, w, D] is a copy, -1 at positions not generated yet (forced ones hold their codes).
    use_cache=False re-runs the teacher-forced forward for every code: slow, the same codes for the same
    generators (a check on the cache). num_threads: torch intra-op threads while sampling on CPU, never
    more than torch's setting (restored afterwards); "auto": 1 for cached sampling of up to 128 rows (faster
    for these tiny sequential steps), else torch's setting; None: torch's setting.
    """
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable as callback(step, codes_so_far), got {callback!r}")
    if num_threads not in (None, "auto") and not (is_whole(num_threads) and num_threads >= 1):
        raise ValueError(f"num_threads must be 'auto', None (keep torch's setting) or a positive integer, "
                         f"got {num_threads!r}")
    plan = _plan(model, conditioning, options, generators, prefix)
    if num_threads == "auto":
        num_threads = auto_threads(plan.rows.shape[0], use_cache)
    h, w, D = model.config.code_shape
    codes = torch.full((plan.B, h * w, D), -1, dtype=torch.long, device=plan.rows.device)  # -1 = not yet
    if plan.forced is not None:
        codes = torch.where(plan.keep[..., None], plan.forced, codes)
    # the cached path's steps multiply R rows by every weight: packed once for R (CPU float32, see cpu.py)
    with _eval_mode(model), torch.inference_mode(), intra_op_threads(num_threads, plan.rows.device), \
            (packed_weights(model, plan.rows.shape[0]) if use_cache else nullcontext()):
        (_sample_cached if use_cache else _sample_uncached)(model, plan, codes, callback)
    return rearrange(codes, "b (h w) d -> b h w d", h=h)


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


def _pick(plan: _Plan, logits: torch.Tensor, codes: torch.Tensor, t: int, d: int) -> torch.Tensor:
    """logits [R, K] of code (t, d) -> codes [B], each request drawn with its own options and generator."""
    logits = logits if logits.dtype == torch.float32 else logits.float()
    picked = []
    for rows, o, filters, g in zip(plan.slices, plan.options, plan.filters, plan.generators):
        lg = logits[rows]
        if o.guided:  # uncond + scale * (cond - uncond), among the codes the conditional rows find plausible
            lg = torch.lerp(logits[rows.start + plan.B:rows.stop + plan.B], logits[rows], o.guidance_scale)
            if o.guidance_cutoff and o.guidance_scale > 1:  # p_cond(k) < cutoff * max p_cond: never drawn
                # (logit gaps are log-ratios); only when extrapolating, so scale 0 stays the unconditional model
                cond = logits[rows]
                lg = lg.masked_fill(cond < cond.amax(-1, keepdim=True) + math.log(o.guidance_cutoff), -math.inf)
        picked.append(sample_logits(lg, o.temperature, *filters[d], generator=g))
    code = picked[0] if len(picked) == 1 else torch.cat(picked)
    if plan.keep is not None:
        code = torch.where(plan.keep[:, t], plan.forced[:, t, d], code)
    codes[:, t, d] = code
    return code


def _report(callback, codes: torch.Tensor, h: int, t: int) -> None:
    if callback is not None:
        callback(t + 1, rearrange(codes, "b (h w) d -> b h w d", h=h).clone())


def _all_forced(plan: _Plan, positions: int) -> list[bool]:
    """Positions forced in every row skip sampling (the same in both paths)."""
    return plan.keep.all(0).tolist() if plan.keep is not None else [False] * positions


def _sample_cached(model, plan: _Plan, codes: torch.Tensor, callback) -> None:
    h, w, D = model.config.code_shape
    R = plan.rows.shape[0]
    spatial_caches, depth_caches = model.new_caches(R), model.new_caches(R, depth=True)
    y = prefill(model, plan.rows, plan.text, spatial_caches)  # [R, 1, dim]: the depth input of position 0
    skip = _all_forced(plan, h * w)
    for t in range(h * w):
        if not skip[t]:
            decode_depths(model, plan, y, depth_caches, codes, t)
        _report(callback, codes, h, t)
        if t + 1 < h * w:
            y = spatial_step(model, codes[:, t], spatial_caches, t + 1, plan.guided)


def prefill(model, rows: torch.Tensor, text: torch.Tensor | None, caches: nn.ModuleList) -> torch.Tensor:
    """Fill the spatial caches up to code position 0 (the prompts, then the start token) -> the spatial output
    there [R, 1, dim], the depth input of position 0."""
    first = prefill_text(model, text, caches) if text is not None else None  # the prompts at [0, L)
    if not model.config.start_token:
        return first  # the last prompt token's output predicts position 0
    return model.spatial_transformer(model.start_inputs(rows, text), caches, model.config.max_text_len)


def spatial_step(model, stacks: torch.Tensor, caches: nn.ModuleList, t: int, guided: bool) -> torch.Tensor:
    """The code stacks [B, D] of position t - 1 -> the spatial output that predicts position t [R, 1, dim]."""
    x = model.code_emb(stacks).sum(1, keepdim=True)  # [B, 1, dim]
    x = x.repeat(2, 1, 1) if guided else x  # both halves hold the same codes
    return model.spatial_transformer(x, caches, model.config.max_text_len + t - (not model.config.start_token))


def decode_depths(model, plan: _Plan, y: torch.Tensor, caches: nn.ModuleList, codes: torch.Tensor, t: int) -> None:
    """The D codes of position t, one depth step each, from its spatial output y [R, 1, dim]."""
    D = model.config.code_shape[2]
    # the depth input of depth d > 0: code d-1's embedding, or the running sum over codes 0..d-1 (cumsum_depth_emb)
    depth_emb = model.depth_code_emb if model.config.cumsum_depth_emb else None
    e = 0
    for d in range(D):
        code = _pick(plan, model.depth_transformer(y, caches, d)[:, 0], codes, t, d)  # [B]
        if d + 1 < D:
            e = model.code_emb(code) if depth_emb is None else depth_emb(code) + e  # [B, dim]
            y = e[:, None] if not plan.guided else e[:, None].repeat(2, 1, 1)  # [R, 1, dim]


def prefill_text(model, text: torch.Tensor, caches: nn.ModuleList) -> torch.Tensor:
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


def _sample_uncached(model, plan: _Plan, codes: torch.Tensor, callback) -> None:
    """The check on the cache: re-run the teacher-forced forward for every code (same draws, same order)."""
    h, w, D = model.config.code_shape
    skip = _all_forced(plan, h * w)
    for t in range(h * w):
        if not skip[t]:
            for d in range(D):
                current = codes.clamp(min=0).repeat(2 if plan.guided else 1, 1, 1)  # [R, h*w, D]; later codes
                logits = model(rearrange(current, "r (h w) d -> r h w d", h=h), plan.rows, plan.text)  # do not
                _pick(plan, logits[:, t // w, t % w, d], codes, t, d)  # matter [R, h, w, D, K]
        _report(callback, codes, h, t)


def generate_one(model, class_labels: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                 num_samples: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 guidance_scale: float = 1.0, guidance_cutoff: float = GUIDANCE_CUTOFF,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                 callback: Callable[[int, torch.Tensor], object] | None = None,
                 num_threads: int | str | None = "auto") -> torch.Tensor:
    """RQTransformer.generate: sample code stacks `LongTensor [B, h, w, D]` for one request given as tensors.

    Takes tensors only (names, lists and counts are the pipeline's to check and convert). class_labels: None
    (all rows null class), or an integer tensor [B] of class indices in [0, num_classes] (num_classes = the
    null class). num_samples: the batch size without labels (default: the prefix or text batch, or 1); with
    labels it may only repeat their length. text_tokens (text models only): prompt token ids [B or 1,
    max_text_len] right-padded with TEXT_PAD_ID (batch 1 is broadcast); None = the empty prompt. The options
    are SamplingOptions' (top_k and top_p may be lists of one value per depth, as the official configs give
    them); guidance applies with labels or text only: then conditional and unconditional rows (null class,
    empty prompt) run in one batch of 2B. prefix, callback, use_cache, num_threads: see `generate`.
    """
    forced, _ = parse_prefix(model, prefix)
    rows, options = one_request(model, class_labels, text_tokens, num_samples, None if forced is None else len(forced),
                                temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                                guidance_cutoff=guidance_cutoff)
    return generate(model, rows, options, generator, prefix, callback, use_cache=use_cache, num_threads=num_threads)


def one_request(model, class_labels=None, text_tokens=None, num_samples=None, prefix_batch=None,
                **options) -> tuple[Conditioning, SamplingOptions]:
    """One request's tensors and options (SamplingOptions' fields) -> its checked rows and options; guidance
    only applies with labels or text (without, there is nothing to guide towards)."""
    options = SamplingOptions(**options)
    options.check_for(model)
    rows = model.conditioning(class_labels, text_tokens, num_samples, prefix_batch)
    if class_labels is None and text_tokens is None:
        options = replace(options, guidance_scale=1.0)
    return rows, options
