"""One GPU check: the tests marked `cuda`, then sampling on the GPU against the reference package, one JSON
line per figure. About 3-5 minutes on one GPU (the first torch.compile takes most of a minute).

    python -m bench.gpu_check            # or: make gpu-check
    python -m bench.gpu_check --quick    # tiny sizes: checks the script
    python -m bench.gpu_check --no-tests # the sampling figures only

Without CUDA it says so in one line and exits 0: there is nothing to check. Exit code 1 if a cuda test
failed. Sampling uses the reference configuration (bench.common.FULL, codebook 512, 8x8x4 codes) at batch
1, 16 and 64: ours in float32, bfloat16 and with compile_steps(), the reference (`generate()`, which
re-runs the forward for every code) at batch 1 and 16. Each time is the median of 3 runs after a warm-up,
with torch.cuda.synchronize() inside the timed region. Then one 256-px image at the paper's FFHQ-355M size
(bench.paper_size, random weights): sampling in float32 (batch 1) and bfloat16 (batch 1 and 4), then decoding.
Last, the paper's evaluation (bench.evaluation_speed): 1,000 samples at that size drawn and saved by
evaluate_fid's code, their Inception features, and the hours 50,000 samples imply (needs pytorch-fid).
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import bench  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS_TIMEOUT_S = 300


def no_cuda_line() -> str:
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    return f"gpu_check: no CUDA GPU visible ({build}); nothing to check on this machine"


def gpu_record() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"figure": "gpu", "name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def cuda_tests() -> dict:
    """pytest -m cuda in a child process; counts and failing test ids from its JUnit XML report."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"figure": "cuda_tests", "timed_out_after_s": TESTS_TIMEOUT_S, "ok": False}
        rec = {"figure": "cuda_tests", "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if not xml.is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            return {**rec, "ok": False, "output_tail": tail}
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    # exit code 5 = no test collected: then nothing failed, but nothing was checked either
    return {**rec, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed_tests": failed, "ok": proc.returncode == 0}


def timed(fn) -> dict:
    """Median seconds of fn (synchronised) and the peak GPU memory it allocated."""
    from bench.common import median_time

    def run():
        fn()
        torch.cuda.synchronize()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m = median_time(run)
    return {**m, "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def sampling_figures(quick: bool) -> list[dict]:
    from bench.common import build_ours, build_reference, emit, reference_top_k, rnd, sizes

    device, cfg = torch.device("cuda"), sizes(quick)
    k = reference_top_k(cfg["codebook_size"])
    batches = (1, 4) if quick else (1, 16, 64)
    model = build_ours(cfg).to(device)
    variants = {"float32": model}
    if torch.cuda.is_bf16_supported():
        variants["bfloat16"] = copy.deepcopy(model).to(torch.bfloat16)
    compiled = copy.deepcopy(model).compile_steps()
    t0 = time.perf_counter()
    compiled.generate(num_samples=batches[-1], top_k=k, generator=torch.Generator(device).manual_seed(0))
    torch.cuda.synchronize()
    out = [emit({"figure": "gpu_compile", "seconds": rnd(time.perf_counter() - t0), "batch": batches[-1],
                 "note": "first generate() after compile_steps(): compiling included"})]
    variants["compiled"] = compiled
    ours = {}
    for name, m in variants.items():
        for b in batches:
            def run(m=m, b=b):
                with torch.inference_mode():
                    m.generate(num_samples=b, top_k=k, generator=torch.Generator(device).manual_seed(0))
            t = timed(run)
            ours[name, b] = t["seconds"]
            out.append(emit({"figure": "gpu_sampling", "impl": "ours", "variant": name, "batch": b, "top_k": k,
                             "seconds": rnd(t["seconds"]), "images_per_s": rnd(b / t["seconds"]), "runs": t["runs"],
                             "peak_mib": t["peak_mib"], "code_shape": list(cfg["code_shape"])}))
    ref = build_reference(cfg).to(device)
    for b in batches[:2]:
        def reference(b=b):
            with torch.inference_mode():
                ref.generate(filter_thres=0.9, default_batch_size=b)
        t = timed(reference)
        best = min(s for (name, batch), s in ours.items() if batch == b)
        out.append(emit({"figure": "gpu_sampling", "impl": "reference", "batch": b, "seconds": rnd(t["seconds"]),
                         "images_per_s": rnd(b / t["seconds"]), "runs": t["runs"], "peak_mib": t["peak_mib"],
                         "speedup_float32": rnd(t["seconds"] / ours["float32", b], 3),
                         "speedup_best": rnd(t["seconds"] / best, 3)}))
    return out


def evaluation_figures_or_note(quick: bool) -> list[dict]:
    """The paper's evaluation: 1,000 FFHQ-size samples and their Inception features (needs pytorch-fid)."""
    from bench.common import emit

    try:
        from bench.evaluation_speed import evaluation_figures
        import pytorch_fid  # noqa: F401
    except ImportError as e:
        return [emit({"figure": "evaluation_throughput", "note": f"skipped: {e} (carry pytorch-fid's wheel)"})]
    return evaluation_figures(quick, torch.device("cuda"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sampling sizes: checks the script, not speed")
    p.add_argument("--no-tests", action="store_true", help="skip pytest -m cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_line(), flush=True)
        return 0
    from bench.common import emit

    t0 = time.perf_counter()
    emit(gpu_record())
    tests = None if args.no_tests else emit(cuda_tests())
    figures = sampling_figures(args.quick)
    from bench.paper_size import timing_figures  # one 256-px image at the FFHQ-355M size, sampled and decoded

    figures += timing_figures(args.quick, torch.device("cuda"))
    figures += evaluation_figures_or_note(args.quick)
    emit({"figure": "gpu_check_summary", "seconds": round(time.perf_counter() - t0, 1),
          "cuda_tests_ok": None if tests is None else tests["ok"], "sampling_figures": len(figures)})
    return 0 if tests is None or tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
