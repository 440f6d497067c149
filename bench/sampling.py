"""Sampling figures: ours vs the reference package, cache on/off, limit ratio, CFG and text-prompt overhead,
peak RSS.

    .venv/bin/python -m bench.sampling            # reference configuration (part of `make bench`)
    .venv/bin/python -m bench.sampling --quick    # tiny sizes: checks the script runs
    .venv/bin/python -m bench.sampling --profile  # torch.profiler table of one cached generate

Ours samples with top_k = the reference's filter_thres=0.9 filter (51 of 512 codes), temperature 1.
The reference runs as shipped (`generate()` re-runs the full forward for each of the h*w*D tokens),
but under torch.inference_mode like ours, which only makes it faster (the ratio is conservative).
Both run in one process with the same torch thread setting; ours uses `generate()`'s default
num_threads="auto": one intra-op thread for cached sampling of up to 32 rows, faster for these tiny
sequential steps (the `sampling_threads` figure gives ours with the process setting too).
When the reference would take too long (batch 64), its time is estimated: one sampling step is
timed at evenly spaced prefix lengths (midpoints of equal strata) and summed over all steps; the
batch-1 figure reports the same estimate beside the full measurement as a check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import (REPEATS, build_ours, build_reference, emit, median_time, parse_args, proc_status_mib,
                          random_codes, reference_top_k, rnd, run_main, sizes, timed_or_skip, with_goal)
import torch
from rqtransformer.sampling import auto_threads

ROOT = Path(__file__).resolve().parents[1]
SPEEDUP_GOALS = (10.0, 30.0, None)  # issue 7, per batch (1, 16, 64): >= 10x the reference, >= 30x
LIMIT_GOAL, CFG_GOAL, RSS_GOAL_MIB = 4.0, 1.6, 1.5 * 1024
TEXT_GOAL, PROMPT_TOKENS, TEXT_VOCAB = 1.1, 16, 1000  # issue 15: a 16-token prompt adds <= 10 %
REF_STRATA = 8          # timed steps for an extrapolated reference run
REF_FULL_LIMIT_S = 150  # measure the reference fully when (warm-up + repeats) fits in this


def batches(quick: bool) -> tuple[int, int, int]:
    return (1, 4, 8) if quick else (1, 16, 64)


def ours_fn(model, batch: int, top_k: int, use_cache: bool = True, labels=None, guidance: float = 1.0,
            num_threads: int | str | None = "auto", text_tokens=None):
    def run():
        g = torch.Generator().manual_seed(0)
        return model.generate(class_labels=labels, num_samples=None if labels is not None else batch, top_k=top_k,
                              guidance_scale=guidance, generator=g, use_cache=use_cache, num_threads=num_threads,
                              text_tokens=text_tokens)
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


def reference_sampling(ref, batch: int, total: int, quick: bool) -> dict:
    est = reference_estimate(ref, batch, total)
    limit = 0.5 if quick else REF_FULL_LIMIT_S  # quick: exercise the extrapolated path too
    rec = {"figure": "sampling", "impl": "reference", "cache": False, "batch": batch}
    if batch == 1 or est["seconds"] * (REPEATS + 1) <= limit:
        with torch.inference_mode():
            m = median_time(lambda: ref.generate(filter_thres=0.9, default_batch_size=batch))
        rec.update(seconds=rnd(m["seconds"]), runs=m["runs"], repeats=REPEATS, extrapolated=False,
                   estimate_seconds=rnd(est["seconds"]), estimate_error=rnd(est["seconds"] / m["seconds"] - 1, 2))
    else:
        rec.update(seconds=rnd(est["seconds"]), extrapolated=True, steps_timed=est["steps_timed"],
                   steps_total=total, step_repeats=est["step_repeats"], prefix_lengths=est["prefix_lengths"])
    rec["images_per_s"] = rnd(batch / rec["seconds"])
    return rec


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
            "repeats": m["repeats"], **extra}


def figures(quick: bool = False) -> list[dict]:
    cfg = sizes(quick)
    h, w, D = cfg["code_shape"]
    k = reference_top_k(cfg["codebook_size"])
    bs = batches(quick)
    out, ours_s = [], {}
    model, ref = build_ours(cfg), build_reference(cfg)
    params = {"ours_params": sum(p.numel() for p in model.parameters()),
              "reference_params": sum(p.numel() for p in ref.parameters())}

    # 1. sampling: ours (cache on) vs the reference, and ours without the cache
    for b, goal in zip(bs, SPEEDUP_GOALS):
        m = median_time(ours_fn(model, b, k))
        ours_s[b] = m["seconds"]
        out.append(emit(ours_record(m, b, True, k, **params)))
        r = emit(reference_sampling(ref, b, h * w * D, quick))
        out.append(r)
        speedup = r["seconds"] / m["seconds"]
        out.append(emit(with_goal({"figure": "sampling_speedup", "batch": b, "speedup": rnd(speedup, 3),
                                   "ours_images_per_s": rnd(b / m["seconds"]),
                                   "reference_images_per_s": r["images_per_s"],
                                   "reference_extrapolated": r["extrapolated"]},
                                  f">= {goal:g}x reference" if goal else None,
                                  speedup >= goal if goal else None)))
    for b, limit in ((bs[0], float("inf")), (bs[1], 60.0)):  # uncached: batch 1 always, 16 if a run < 60 s
        m = timed_or_skip(ours_fn(model, b, k, use_cache=False), limit)
        extra = {} if "skipped" in m else {"cache_speedup": rnd(m["seconds"] / ours_s[b], 3)}
        out.append(emit(ours_record(m, b, False, k, **extra)))

    # 1b. generate()'s default of one intra-op thread vs the process setting (what the reference uses)
    for b in bs:
        m = median_time(ours_fn(model, b, k, num_threads=None))
        out.append(emit({"figure": "sampling_threads", "batch": b, "process_threads": torch.get_num_threads(),
                         "process_threads_seconds": rnd(m["seconds"]), "runs": m["runs"],
                         "default_seconds": rnd(ours_s[b]),
                         "default_threads": threads_used(b, True),
                         "speedup": rnd(m["seconds"] / ours_s[b], 3)}))

    # 2. limit ratio: sampling time / one teacher-forced forward over the same batch (same FLOPs, no steps)
    for b in bs[1:]:
        codes = random_codes(cfg, b)
        with torch.inference_mode():
            f = median_time(lambda: model(codes))
        ratio = ours_s[b] / f["seconds"]
        goal = b == bs[1]
        out.append(emit(with_goal({"figure": "limit_ratio", "batch": b, "sampling_seconds": rnd(ours_s[b]),
                                   "forward_seconds": rnd(f["seconds"]), "ratio": rnd(ratio, 3)},
                                  f"<= {LIMIT_GOAL:g}x teacher-forced forward" if goal else None,
                                  ratio <= LIMIT_GOAL if goal else None)))

    # 3. CFG overhead: a class-conditional model (9 classes), guidance 3 vs 1 at batch 16
    cond, b = build_ours(cfg, num_classes=9), bs[1]
    labels = torch.arange(b) % 9
    guided = median_time(ours_fn(cond, b, k, labels=labels, guidance=3.0))
    plain = median_time(ours_fn(cond, b, k, labels=labels, guidance=1.0))
    ratio = guided["seconds"] / plain["seconds"]
    out.append(emit(with_goal({"figure": "cfg_overhead", "batch": b, "guidance_scale": 3.0,
                               "guided_seconds": rnd(guided["seconds"]), "unguided_seconds": rnd(plain["seconds"]),
                               "ratio": rnd(ratio, 3), "repeats": REPEATS},
                              f"<= {CFG_GOAL:g}x unguided", ratio <= CFG_GOAL)))

    # 4. text prompt overhead: the same sizes with a 16-token prompt prefixing the codes vs no text, batch 16
    text_model = build_ours({**cfg, "text_vocab_size": TEXT_VOCAB, "max_text_len": PROMPT_TOKENS})
    prompt = torch.randint(1, TEXT_VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    prompted = median_time(ours_fn(text_model, b, k, text_tokens=prompt))
    plain = median_time(ours_fn(model, b, k))
    ratio = prompted["seconds"] / plain["seconds"]
    out.append(emit(with_goal({"figure": "text_prompt_overhead", "batch": b, "prompt_tokens": PROMPT_TOKENS,
                               "prompt_seconds": rnd(prompted["seconds"]), "no_text_seconds": rnd(plain["seconds"]),
                               "ratio": rnd(ratio, 3), "repeats": REPEATS},
                              f"<= {TEXT_GOAL:g}x no text", ratio <= TEXT_GOAL)))

    # 6a. peak RSS of sampling at batch 16, in a fresh process
    out.append(emit(peak_rss_sampling(b, quick)))
    return out


def peak_rss_sampling(batch: int, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.sampling", "--rss-child", "--batch", str(batch),
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
