"""Sampling from an RQTransformer: KV-cached spatial steps, D depth steps per position, CFG, completion.

`generate` is attached to the model as `RQTransformer.generate`. Both paths (`use_cache=True/False`)
draw random numbers in the same order (one `torch.multinomial` call per sampled (position, depth)),
so for the same generator seed they return the same codes.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import torch
from einops import rearrange

ONE_THREAD_MAX_ROWS = 32  # num_threads="auto": one intra-op thread up to this many rows (see auto_threads)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, K] -> sampled indices [B]: temperature, then top-k, then nucleus (top-p) filtering.

    With a filter, only the k best codes (all K, sorted, for top-p alone) are softmaxed and drawn
    from: the same distribution as masking the rest to -inf, at a fraction of the work for small k.
    """
    if temperature != 1.0:
        logits = logits / temperature
    K = logits.shape[-1]
    if (top_k is None or top_k >= K) and (top_p is None or top_p >= 1.0):
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    best, index = torch.topk(logits, min(top_k or K, K), dim=-1)  # [B, k] each, best first
    if top_p is not None and top_p < 1.0:
        probs = best.softmax(-1)
        best = best.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))  # better codes hold >= top_p
    choice = torch.multinomial(best.softmax(-1), 1, generator=generator)  # [B, 1] index into the k best
    return index.gather(-1, choice).squeeze(-1)


def _check_options(model, temperature, top_k, top_p, guidance_scale, callback, num_threads) -> None:
    K = model.config.codebook_size
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r} (for greedy decoding use top_k=1)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= K):
        raise ValueError(f"top_k must be None or an integer in [1, {K}] (the codebook size), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not 0 <= guidance_scale < float("inf"):
        raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance), got {guidance_scale!r}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable as callback(step, codes_so_far), got {callback!r}")
    if num_threads not in (None, "auto") and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                              or num_threads < 1):
        raise ValueError(f"num_threads must be 'auto', None (keep torch's setting) or a positive integer, "
                         f"got {num_threads!r}")


def auto_threads(rows: int, use_cache: bool) -> int | None:
    """num_threads="auto": 1 for cached sampling of <= ONE_THREAD_MAX_ROWS rows, else torch's setting.

    Each cached step is a few hundred tiny ops; splitting them across cores costs more in thread
    wake-ups than it saves. Measured on 2 cores, reference sizes: batch 1 0.32 -> 0.20 s and batch 16
    0.75 -> 0.55 s on one thread, but batch 64 1.35 -> 1.50 s, and the uncached path (full forwards)
    is 1.8x slower on one thread.
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


def _label_list(model, class_labels) -> list[int]:
    """class_labels (int, str, list of int/str, or 1-D integer tensor) -> list of class indices."""
    c = model.config
    if c.num_classes == 0:
        raise ValueError("this model is unconditional (num_classes=0): pass class_labels=None "
                         "and set the batch size with num_samples")
    if isinstance(class_labels, torch.Tensor):
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.ndim > 1:
            raise ValueError(f"class_labels tensor must be 0-D or 1-D integer, got {class_labels.dtype} "
                             f"with shape {list(class_labels.shape)}")
        items = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (list, tuple)):
        items = list(class_labels)
    else:
        items = [class_labels]
    if not items:
        raise ValueError("class_labels is empty: give at least one label, or None for unconditional samples")
    labels = []
    for item in items:
        if isinstance(item, str):
            if item not in c.class_names:
                raise ValueError(f"unknown class name {item!r}; known classes: {c.class_names}")
            item = c.class_names.index(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"class labels must be integers (or class names), got {item!r}")
        if not 0 <= item < c.num_classes:
            names = f" ({', '.join(c.class_names)})" if c.class_names else ""
            raise ValueError(f"class label {item} is out of range: this model has {c.num_classes} classes, "
                             f"0..{c.num_classes - 1}{names}; use class_labels=None for unconditional samples")
        labels.append(item)
    return labels


def _parse_prefix(model, prefix):
    """prefix -> (codes [Bp, h*w, D] long, keep [Bp, h*w] bool) on the model's device, or (None, None)."""
    if prefix is None:
        return None, None
    h, w, D = model.config.code_shape
    K = model.config.codebook_size
    if isinstance(prefix, tuple):
        if len(prefix) != 2:
            raise ValueError("prefix as a tuple must be (codes [B, h, w, D], keep_mask [B, h, w])")
        codes, keep = prefix
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise ValueError(f"keep_mask must be a bool tensor [B, {h}, {w}] (True = keep the given code)")
        keep = keep[None] if keep.ndim == 2 else keep
        if keep.ndim != 3 or tuple(keep.shape[1:]) != (h, w):
            raise ValueError(f"keep_mask must have shape [B, {h}, {w}] or [{h}, {w}], got {list(keep.shape)}")
        expected = f"[B, {h}, {w}, {D}] or [{h}, {w}, {D}]"
        grid = (h, w, D)
    elif isinstance(prefix, torch.Tensor):
        codes, keep = prefix, None
        expected = f"[B, k, {D}] or [k, {D}] with k <= {h * w}"
        grid = None
    else:
        raise ValueError("prefix must be a code tensor [B, k, D] for the first k positions, "
                         f"or a tuple (codes, keep_mask), got {type(prefix).__name__}")
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"prefix codes must be an integer tensor {expected}")
    codes = codes[None] if codes.ndim == (3 if grid else 2) else codes
    if grid:
        ok = codes.ndim == 4 and tuple(codes.shape[1:]) == grid
    else:
        ok = codes.ndim == 3 and codes.shape[2] == D and codes.shape[1] <= h * w
    if not ok:
        raise ValueError(f"prefix codes must have shape {expected}, got {list(codes.shape)}")
    device = model.head.weight.device
    codes = codes.to(device=device, dtype=torch.long)
    if keep is None:  # first k positions forced
        k = codes.shape[1]
        keep = torch.zeros(codes.shape[0], h * w, dtype=torch.bool, device=device)
        keep[:, :k] = True
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], h * w - k, D)], dim=1)  # [Bp, h*w, D]
    else:
        if codes.shape[0] != keep.shape[0] and 1 not in (codes.shape[0], keep.shape[0]):
            raise ValueError(f"prefix codes batch ({codes.shape[0]}) and keep_mask batch ({keep.shape[0]}) differ")
        bp = max(codes.shape[0], keep.shape[0])
        keep = rearrange(keep.to(device), "b h w -> b (h w)").expand(bp, -1)
        codes = rearrange(codes, "b h w d -> b (h w) d").expand(bp, -1, -1)
    kept = codes[keep]  # [M, D] only the forced stacks must be valid codes
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= K):
        raise ValueError(f"prefix code values must be in [0, {K}), got range [{int(kept.min())}, {int(kept.max())}]")
    return codes.masked_fill(~keep[..., None], 0), keep


def generate(model, class_labels=None, num_samples: int | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, guidance_scale: float = 1.0,
             generator: torch.Generator | None = None, use_cache: bool = True, prefix=None,
             callback: Callable[[int, torch.Tensor], object] | None = None,
             num_threads: int | str | None = "auto") -> torch.Tensor:
    """Sample code stacks `LongTensor [B, h, w, D]`.

    class_labels: None (null class / unconditional model), an int or class name, a list, or a 1-D tensor.
    num_samples: batch size; repeats a single label. With neither, B = the prefix batch or 1.
    top_k=1 is greedy decoding. guidance_scale != 1 on a conditional model runs conditional and
    null-class rows in one batch of 2B: logits = uncond + scale * (cond - uncond).
    prefix: codes [B, k, D] / [k, D] forcing the first k positions (row-major), or a tuple
    (codes [B, h, w, D], keep_mask [B, h, w] bool) forcing the positions where keep_mask is True.
    A prefix with batch 1 is broadcast to B.
    callback(step, codes_so_far): called after each position, step = positions done (1..h*w);
    codes_so_far [B, h, w, D] is a copy in which positions not generated yet are -1, except
    forced (prefix) positions, which hold their codes from the start. Its return value is ignored.
    num_threads: torch intra-op threads while sampling on CPU, never more than torch's setting, which
    is restored afterwards. "auto" (default): 1 for cached sampling of up to 32 rows (faster for these
    tiny sequential steps), else torch's setting; None: torch's setting.
    """
    _check_options(model, temperature, top_k, top_p, guidance_scale, callback, num_threads)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    forced, keep = _parse_prefix(model, prefix)
    prefix_batch = forced.shape[0] if forced is not None else None
    labels = None if class_labels is None else _label_list(model, class_labels)
    if labels is None:
        B = num_samples or prefix_batch or 1
    else:
        if len(labels) == 1:
            labels = labels * (num_samples or prefix_batch or 1)
        elif num_samples is not None and num_samples != len(labels):
            raise ValueError(f"num_samples={num_samples} does not match the {len(labels)} class labels given; "
                             "give one label per sample, or a single label to repeat")
        B = len(labels)
    if forced is not None:
        if prefix_batch not in (1, B):
            raise ValueError(f"prefix has batch {prefix_batch} but {B} samples are requested; "
                             "give a prefix with batch 1 or one per sample")
        forced, keep = forced.expand(B, -1, -1), keep.expand(B, -1)

    device = model.head.weight.device
    null = torch.full((B,), model.null_class, dtype=torch.long, device=device)
    cfg = labels is not None and guidance_scale != 1.0
    rows = null if labels is None else torch.tensor(labels, dtype=torch.long, device=device)
    if cfg:
        rows = torch.cat([rows, null])  # [2B]: conditional rows, then null-class rows
    was_training = model.training
    model.eval()
    try:
        if num_threads == "auto":
            num_threads = auto_threads(rows.shape[0], use_cache)
        with torch.inference_mode(), _intra_op_threads(num_threads, device):
            run = _sample_cached if use_cache else _sample_uncached
            codes = run(model, rows, B, cfg, float(guidance_scale), float(temperature), top_k, top_p,
                        generator, forced, keep, callback)
    finally:
        model.train(was_training)
    h, w, D = model.config.code_shape
    return rearrange(codes, "b (h w) d -> b h w d", h=h)


def _setup(model, B, cfg, scale, temperature, top_k, top_p, generator, forced, keep):
    h, w, D = model.config.code_shape
    device = model.head.weight.device
    codes = torch.full((B, h * w, D), -1, dtype=torch.long, device=device)  # -1 = not generated yet
    if forced is not None:
        codes = torch.where(keep[..., None], forced, codes)
        all_forced = keep.all(0).tolist()  # positions forced in every row skip sampling (same in both paths)
    else:
        all_forced = [False] * (h * w)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [R, K] -> codes [B]
        logits = logits.float()
        if cfg:  # uncond + scale * (cond - uncond)
            logits = torch.lerp(logits[B:], logits[:B], scale)
        return sample_logits(logits, temperature, top_k, top_p, generator)

    def report(callback, t):
        if callback is not None:
            callback(t + 1, rearrange(codes, "b (h w) d -> b h w d", h=h).clone())

    return codes, all_forced, pick, report


def _sample_cached(model, rows, B, cfg, scale, temperature, top_k, top_p, generator, forced, keep, callback):
    h, w, D = model.config.code_shape
    codes, all_forced, pick, report = _setup(model, B, cfg, scale, temperature, top_k, top_p, generator,
                                             forced, keep)
    R = rows.shape[0]
    spatial_cache, depth_cache = model.new_cache(R), model.new_cache(R, depth=True)
    spatial_pos, depth_pos, code_emb = model.spatial_pos, model.depth_pos, model.code_emb
    x = model.start_tokens(rows)  # [R, dim] spatial input of position 0
    for t in range(h * w):
        out = model.spatial_step(x, t, spatial_cache)  # [R, dim]
        if not all_forced[t]:
            keep_t = keep[:, t] if keep is not None else None  # [B]
            y = out + depth_pos[0]  # [R, dim]
            for d in range(D):
                code = pick(model.depth_step(y, d, depth_cache))  # [B]
                if keep_t is not None:
                    code = torch.where(keep_t, forced[:, t, d], code)
                codes[:, t, d] = code
                if d + 1 < D:
                    y = code_emb(code) + depth_pos[d + 1]  # [B, dim]
                    if cfg:
                        y = y.repeat(2, 1)  # [2B, dim]: both halves continue with the same code
        report(callback, t)
        if t + 1 < h * w:
            x = code_emb(codes[:, t]).sum(1) + spatial_pos[t + 1]  # [B, dim]
            if cfg:
                x = x.repeat(2, 1)
    return codes


def _sample_uncached(model, rows, B, cfg, scale, temperature, top_k, top_p, generator, forced, keep, callback):
    """Reference path: recompute the teacher-forced spatial and depth transformers for every code."""
    h, w, D = model.config.code_shape
    codes, all_forced, pick, report = _setup(model, B, cfg, scale, temperature, top_k, top_p, generator,
                                             forced, keep)
    reps = 2 if cfg else 1
    for t in range(h * w):
        if not all_forced[t]:
            current = codes.clamp(min=0).repeat(reps, 1, 1)  # [R, h*w, D]; later codes do not matter
            out = model.spatial_forward(current, rows)[:, t]  # [R, dim]
            for d in range(D):
                logits = model.depth_forward(out, codes[:, t].clamp(min=0).repeat(reps, 1))  # [R, D, K]
                code = pick(logits[:, d])
                if keep is not None:
                    code = torch.where(keep[:, t], forced[:, t, d], code)
                codes[:, t, d] = code
        report(callback, t)
    return codes
