"""Sampling figures: ours vs the reference package, cache on/off, limit ratio, CFG and text-prompt overhead,
peak RSS.

    .venv/bin/python -m bench.sampling_speed            # reference configuration (part of `make bench`)
    .venv/bin/python -m bench.sampling_speed --quick    # tiny sizes: checks the script runs
    .venv/bin/python -m bench.sampling_speed --profile  # torch.profiler table of one cached generate

Ours samples with top_k = the reference's filter_thres=0.9 filter (51 of 512 codes), temperature 1.
The reference runs as shipped (`generate()` re-runs the full forward for each of the h*w*D tokens),
but under torch.inference_mode like ours, which only makes it faster (the ratio is conservative).
Both run in one process with the same torch thread setting; ours uses `generate()`'s default
num_threads="auto": one intra-op thread for cached sampling of up to 128 rows, faster for these tiny
sequential steps (the `sampling_threads` figure gives ours with the process setting too).
When the reference would take too long (batch 64), its time is estimated: one sampling step is
timed at evenly spaced prefix lengths (midpoints of equal strata) and summed over all steps; the
batch-1 figure reports the same estimate beside the full measurement as a check.

Compared figures (ours vs the reference, sampling vs forward, guided vs not, ...) run in alternating
rounds (`paired_times`), so a shared machine's changing load affects both sides alike; each record
carries the load average and, for ours, the median process CPU seconds. `sampling_float16_weights`
times the opt-in `RQTransformer.quantized_for_cpu()` copy against the float32 model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (REPEATS, build_ours, build_reference, emit, median_time, paired_times, parse_args,
                          proc_status_mib, random_codes, reference_top_k, rnd, run_main, sizes, with_goal)
import torch
from rqtransformer.sampling import auto_threads

ROOT = Path(__file__).resolve().parents[1]
SPEEDUP_GOALS = (25.0, 50.0, None)  # per batch (1, 16, 64): >= 25x the reference, >= 50x, none
LIMIT_GOAL, CFG_GOAL, RSS_GOAL_MIB = 3.0, 1.6, 1.5 * 1024  # sampling <= 3x a forward at batch 16
OURS_REPEATS = 5        # ours is fast: more repeats for steadier medians on a shared machine
TEXT_GOAL, PROMPT_TOKENS, TEXT_VOCAB = 1.1, 16, 1000  # a 16-token prompt adds <= 10 %
REF_STRATA = 8          # timed steps for an extrapolated reference run
REF_FULL_LIMIT_S = 150  # measure the reference fully when (warm-up + repeats) fits in this


def batches(quick: bool) -> tuple[int, int, int]:
    return (1, 4, 8) if quick else (1, 16, 64)


def ours_fn(model, batch: int, top_k: int, use_cache: bool = True, labels=None, guidance: float = 1.0,
            num_threads: int | str | None = "auto", text_tokens=None):
    def run(callback=None):
        g = torch.Generator().manual_seed(0)
        return model.generate(class_labels=labels, num_samples=None if labels is not None else batch, top_k=top_k,
                              guidance_scale=guidance, generator=g, use_cache=use_cache, num_threads=num_threads,
                              text_tokens=text_tokens, callback=callback)
    return run


def reference_estimate(ref, batch: int, total: int, strata: int = REF_STRATA) -> dict:
    """Time one reference sampling step (forward on the prefix, top-k, gumbel, append) at the midpoint
    of each of `strata` equal ranges of prefix lengths; total = sum of medians * steps per stratum."""
    from rq_transformer.rq_transformer import gumbel_sample, top_k

    K = ref.to_logits.out_features
    stride = total / strata
    lengths = [int(stride * (i + 0.5)) for i in range(strata)]

    def step_fn(length):
        seq = torch.randint(0, K, (batch, length))
        def step():  # the body of the reference's generate() loop
            logits = top_k(ref.forward(seq)[:, -1], thres=0.9)
            return torch.cat((seq, gumbel_sample(logits, dim=-1, temperature=1.0)[:, None]), dim=-1)
        return step

    with torch.inference_mode():
        step_fn(lengths[-1])()  # warm-up
        medians = [median_time(step_fn(n), warmup=0)["seconds"] for n in lengths]
    return {"seconds": sum(medians) * stride, "steps_timed": strata, "step_repeats": REPEATS,
            "prefix_lengths": lengths}


def reference_sampling(ref, ours: dict, batch: int, total: int, quick: bool) -> tuple[dict, dict]:
    """(timings of the `ours` functions, reference record). All of them run in alternating rounds (paired,
    so changing load affects all alike), the reference too when it runs fully; else it is extrapolated."""
    est = reference_estimate(ref, batch, total)
    limit = 0.5 if quick else REF_FULL_LIMIT_S  # quick: exercise the extrapolated path too
    rec = {"figure": "sampling", "impl": "reference", "cache": False, "batch": batch}
    if batch == 1 or est["seconds"] * (REPEATS + 1) <= limit:
        def reference():
            with torch.inference_mode():
                ref.generate(filter_thres=0.9, default_batch_size=batch)
        t = paired_times({**ours, "reference": reference})
        r = t.pop("reference")
        rec.update(seconds=rnd(r["seconds"]), runs=r["runs"], repeats=REPEATS, cpu_seconds=r["cpu_seconds"],
                   extrapolated=False, paired_with_ours=True, estimate_seconds=rnd(est["seconds"]),
                   estimate_error=rnd(est["seconds"] / r["seconds"] - 1, 2))
    else:
        t = paired_times(ours, OURS_REPEATS)
        rec.update(seconds=rnd(est["seconds"]), extrapolated=True, steps_timed=est["steps_timed"],
                   steps_total=total, step_repeats=est["step_repeats"], prefix_lengths=est["prefix_lengths"])
    rec["images_per_s"] = rnd(batch / rec["seconds"])
    return t, rec


def half_weights(model):
    """model.quantized_for_cpu(), or None where this CPU/torch has no fbgemm float16 kernels."""
    try:
        return model.quantized_for_cpu()
    except ValueError:
        return None


def default_weights(model) -> tuple[str, object]:
    """(name, copy) of the CPU weights RQPipeline's cpu_weights="auto" gives model here; copy None if unavailable."""
    from rqtransformer.cpu_weights import default_cpu_weights

    name = default_cpu_weights(model)
    try:
        return name, model.quantized_for_cpu(name)
    except ValueError:
        return name, None


class _OverBudget(Exception):
    pass


class _Budget:
    """generate's per-position callback: stops the run once it passes limit_s, counting the positions done."""

    def __init__(self, limit_s: float):
        self.limit_s, self.t0, self.done = limit_s, time.perf_counter(), 0

    def __call__(self, step, codes):
        self.done = step
        if time.perf_counter() - self.t0 > self.limit_s:
            raise _OverBudget


def timed_or_skip(fn, limit_s: float, positions: int) -> dict:
    """median_time(fn), unless its warm-up run (stopped once it passes limit_s) would take longer: then say
    so with an estimate from the positions done."""
    budget = _Budget(limit_s)
    try:
        fn(callback=budget)
    except _OverBudget:
        spent, done = time.perf_counter() - budget.t0, budget.done
        return {"skipped": f"one run would take ~{spent * positions / done:.0f} s > {limit_s:.0f} s budget "
                           f"({done} of {positions} positions in {spent:.1f} s)"}
    return median_time(fn, REPEATS, warmup=0)


def threads_used(rows: int, cache: bool) -> int:
    """Intra-op threads generate(num_threads="auto") samples `rows` rows on."""
    n = auto_threads(rows, cache)
    return torch.get_num_threads() if n is None else min(n, torch.get_num_threads())


def ours_record(m: dict, batch: int, cache: bool, top_k: int, **extra) -> dict:
    rec = {"figure": "sampling", "impl": "ours", "cache": cache, "batch": batch, "top_k": top_k,
           "sampling_threads": threads_used(batch, cache)}
    if "skipped" in m:
        return {**rec, **m, **extra}
    return {**rec, "seconds": rnd(m["seconds"]), "images_per_s": rnd(batch / m["seconds"]), "runs": m["runs"],
            "repeats": m["repeats"], "cpu_seconds": m.get("cpu_seconds"), **extra}


def figures(quick: bool = False) -> list[dict]:
    cfg = sizes(quick)
    k, bs = reference_top_k(cfg["codebook_size"]), batches(quick)
    model, ref = build_ours(cfg), build_reference(cfg)
    half = half_weights(model)  # the opt-in float16 weights, where fbgemm exists
    out = speed_figures(cfg, model, ref, half, k, bs, quick)
    out += thread_figures(model, k, bs)
    out += limit_figures(cfg, model, half, k, bs)
    out += overhead_figures(cfg, model, k, bs[1])
    out.append(emit(peak_rss_sampling(bs[1], quick)))  # peak RSS of sampling at batch 16, in a fresh process
    return out


def speed_figures(cfg: dict, model, ref, half, k: int, bs, quick: bool) -> list[dict]:
    """Sampling: ours (cache on) vs the reference, with the float16 weights in the same rounds at batch 1
    and 16; then ours without the cache."""
    h, w, D = cfg["code_shape"]
    out, ours_s = [], {}
    params = {"ours_params": sum(p.numel() for p in model.parameters()),
              "reference_params": sum(p.numel() for p in ref.parameters())}
    for b, goal in zip(bs, SPEEDUP_GOALS):
        fns = {"float32": ours_fn(model, b, k)}
        if half is not None and b in bs[:2]:
            fns["float16"] = ours_fn(half, b, k)
        t, r = reference_sampling(ref, fns, b, h * w * D, quick)
        m = t["float32"]
        ours_s[b] = m["seconds"]
        out.append(emit(ours_record(m, b, True, k, **params)))
        out.append(emit(r))
        speedup = r["seconds"] / m["seconds"]
        out.append(emit(with_goal({"figure": "sampling_speedup", "batch": b, "speedup": rnd(speedup, 3),
                                   "ours_images_per_s": rnd(b / m["seconds"]),
                                   "reference_images_per_s": r["images_per_s"],
                                   "reference_extrapolated": r["extrapolated"]},
                                  f">= {goal:g}x reference" if goal else None,
                                  speedup >= goal if goal else None)))
        if "float16" in t:
            out.append(emit(float16_record(t, r, b, goal)))
        elif b in bs[:2]:
            out.append(emit({"figure": "sampling_float16_weights", "batch": b, "skipped": "no fbgemm on this CPU"}))
    for b, limit in ((bs[0], float("inf")), (bs[1], 60.0)):  # uncached: batch 1 always, 16 if a run < 60 s
        m = timed_or_skip(ours_fn(model, b, k, use_cache=False), limit, positions=h * w)
        extra = {} if "skipped" in m else {"cache_speedup": rnd(m["seconds"] / ours_s[b], 3)}
        out.append(emit(ours_record(m, b, False, k, **extra)))
    return out


def float16_record(t: dict, r: dict, b: int, goal: float | None) -> dict:
    """The float16 weights against the float32 model and the reference, timed in the same rounds."""
    m, f16 = t["float32"], t["float16"]["seconds"]
    return with_goal({
        "figure": "sampling_float16_weights", "batch": b, "float16_seconds": rnd(f16),
        "float32_seconds": rnd(m["seconds"]), "float16_cpu_seconds": t["float16"]["cpu_seconds"],
        "float32_cpu_seconds": m["cpu_seconds"], "speedup_vs_float32": rnd(m["seconds"] / f16, 3),
        "speedup_vs_reference": rnd(r["seconds"] / f16, 3), "repeats": t["float16"]["repeats"],
        "reference_extrapolated": r["extrapolated"]},
        f">= {goal:g}x reference with float16 weights (opt-in)" if goal else None,
        r["seconds"] / f16 >= goal if goal else None)


def thread_figures(model, k: int, bs) -> list[dict]:
    """generate()'s default of one intra-op thread vs the process setting (what the reference uses)."""
    out = []
    for b in bs:
        t = paired_times({"process": ours_fn(model, b, k, num_threads=None), "default": ours_fn(model, b, k)})
        m, d = t["process"], t["default"]["seconds"]
        out.append(emit({"figure": "sampling_threads", "batch": b, "process_threads": torch.get_num_threads(),
                         "process_threads_seconds": rnd(m["seconds"]), "runs": m["runs"],
                         "default_seconds": rnd(d), "default_threads": threads_used(b, True),
                         "speedup": rnd(m["seconds"] / d, 3)}))
    return out


def limit_figures(cfg: dict, model, half, k: int, bs) -> list[dict]:
    """Limit ratio: sampling time / one teacher-forced forward over the same batch (same FLOPs, no steps),
    timed in alternating rounds; with float16 weights too (against the same float32 forward)."""
    out = []
    for b in bs[1:]:
        codes = random_codes(cfg, b)

        def forward():
            with torch.inference_mode():
                model(codes)
        fns = {"sampling": ours_fn(model, b, k), "forward": forward}
        if half is not None and b == bs[1]:
            fns["float16_sampling"] = ours_fn(half, b, k)
        t = paired_times(fns)
        f = t["forward"]["seconds"]
        ratio = t["sampling"]["seconds"] / f
        goal = b == bs[1]
        rec = {"figure": "limit_ratio", "batch": b, "sampling_seconds": rnd(t["sampling"]["seconds"]),
               "forward_seconds": rnd(f), "ratio": rnd(ratio, 3), "repeats": REPEATS}
        if "float16_sampling" in t:
            rec.update(float16_sampling_seconds=rnd(t["float16_sampling"]["seconds"]),
                       float16_ratio=rnd(t["float16_sampling"]["seconds"] / f, 3))
        out.append(emit(with_goal(rec, f"<= {LIMIT_GOAL:g}x teacher-forced forward" if goal else None,
                                  ratio <= LIMIT_GOAL if goal else None)))
    return out


def overhead_figures(cfg: dict, model, k: int, b: int) -> list[dict]:
    """CFG overhead (a class-conditional model of 9 classes, guidance 3 vs 1) and text-prompt overhead (the
    same sizes with a 16-token prompt prefixing the codes vs no text), both at batch `b`."""
    cond = build_ours(cfg, num_classes=9)
    labels = torch.arange(b) % 9
    t = paired_times({"guided": ours_fn(cond, b, k, labels=labels, guidance=3.0),
                      "plain": ours_fn(cond, b, k, labels=labels, guidance=1.0)})
    guided, plain = t["guided"], t["plain"]
    ratio = guided["seconds"] / plain["seconds"]
    out = [emit(with_goal({"figure": "cfg_overhead", "batch": b, "guidance_scale": 3.0,
                           "guided_seconds": rnd(guided["seconds"]), "unguided_seconds": rnd(plain["seconds"]),
                           "ratio": rnd(ratio, 3), "repeats": REPEATS},
                          f"<= {CFG_GOAL:g}x unguided", ratio <= CFG_GOAL))]
    text_model = build_ours({**cfg, "text_vocab_size": TEXT_VOCAB, "max_text_len": PROMPT_TOKENS})
    prompt = torch.randint(1, TEXT_VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    t = paired_times({"prompted": ours_fn(text_model, b, k, text_tokens=prompt), "plain": ours_fn(model, b, k)})
    prompted, plain = t["prompted"], t["plain"]
    ratio = prompted["seconds"] / plain["seconds"]
    out.append(emit(with_goal({"figure": "text_prompt_overhead", "batch": b, "prompt_tokens": PROMPT_TOKENS,
                               "prompt_seconds": rnd(prompted["seconds"]), "no_text_seconds": rnd(plain["seconds"]),
                               "ratio": rnd(ratio, 3), "repeats": REPEATS},
                              f"<= {TEXT_GOAL:g}x no text", ratio <= TEXT_GOAL)))
    return out


def peak_rss_sampling(batch: int, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.sampling_speed", "--rss-child", "--batch", str(batch),
           "--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    rec = {"figure": "peak_rss_sampling", "batch": batch}
    if proc.returncode:
        return {**rec, "skipped": f"child failed: {proc.stderr.strip().splitlines()[-1:]}"}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = child["peak_rss_mib"]
    return with_goal({**rec, **child}, f"< {RSS_GOAL_MIB / 1024:g} GiB", peak < RSS_GOAL_MIB)


def rss_child(batch: int, quick: bool) -> None:
    """Fresh process: import, build the model, sample once; print peak RSS (includes torch itself).

    Peak = VmHWM of this process image. Not ru_maxrss: Linux carries that across exec, so a child
    forked from the (large) benchmark process would report the parent's size."""
    cfg = sizes(quick)
    model = build_ours(cfg)
    before = proc_status_mib("VmRSS")
    ours_fn(model, batch, reference_top_k(cfg["codebook_size"]))()
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"peak_rss_mib": round(peak, 1), "rss_before_sampling_mib": round(before, 1),
                      "sampling_added_mib": round(peak - before, 1)}))


def profile(quick: bool, batch: int, rows: int = 25) -> None:
    """Where the time of one cached generate goes (ops sorted by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile as prof

    cfg = sizes(quick)
    model = build_ours(cfg)
    run = ours_fn(model, batch, reference_top_k(cfg["codebook_size"]))
    run()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        run()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    def extra(p):
        p.add_argument("--rss-child", action="store_true", help="internal: peak-RSS child process")
        p.add_argument("--profile", action="store_true", help="print a torch.profiler table and exit")
        p.add_argument("--batch", type=int, default=None)
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.rss_child:
        return rss_child(args.batch or batches(args.quick)[1], args.quick)
    if args.profile:
        return profile(args.quick, args.batch or 1)
    return run_main(figures, args)


if __name__ == "__main__":
    main()
