"""Shared benchmark helpers: command line, timing (median of repeats, warm-up excluded), machine info,
model builders for the reference configuration of ../shared/DESIGN.md, and JSON output."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import bench  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch

from rqcore.machine import cpu_tag

REPEATS = 3  # median of >= 3 timed runs for every figure
QUICK_RUN = False  # set by parse_args(--quick): goals are not judged on tiny sizes

# Reference configuration (DESIGN.md): ~6.6 M parameters. QUICK: tiny sizes to check the scripts run.
FULL = dict(codebook_size=512, code_shape=(8, 8, 4), dim=256, heads=4, spatial_layers=6, depth_layers=2)
QUICK = dict(codebook_size=64, code_shape=(4, 4, 2), dim=64, heads=2, spatial_layers=2, depth_layers=1)


def sizes(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    """--quick (tiny sizes, for checking the scripts) and --threads (default: torch's choice)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and batches: checks the script, not speed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or cores)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    global QUICK_RUN
    QUICK_RUN = args.quick
    set_threads(args.threads)
    return args


def proc_status_mib(field: str, pid: int | str = "self") -> float:
    """A memory field of /proc/<pid>/status in MiB (Linux), e.g. "VmHWM": the peak RSS of the process image."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def median_time(fn, repeats: int = REPEATS, warmup: int = 1) -> dict:
    """Run fn `warmup` times untimed, then `repeats` times; seconds as median and all runs, and the
    median CPU seconds of this process (all its threads: less sensitive than wall time to other load)."""
    return paired_times({"fn": fn}, repeats, warmup)["fn"]


def paired_times(fns: dict, repeats: int = REPEATS, warmup: int = 1) -> dict[str, dict]:
    """Time several functions in alternating rounds (order reversed every other round), so that changing
    load on a shared machine affects all alike; per function: median wall seconds, runs, median CPU seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"seconds": statistics.median(wall[name]), "runs": [round(t, 4) for t in wall[name]],
                   "repeats": repeats, "cpu_seconds": round(statistics.median(cpu[name]), 4)} for name in names}


def machine_info(quick: bool = False) -> dict:
    """Who measured what, where: call at start (the load average tells how busy the machine was)."""
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME")}
    return {
        "figure": "machine",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": env,
        "omp_wait_policy_effective": not bench.TORCH_IMPORTED_BEFORE_BENCH,
        "quick": quick,
    }


_CPU_TAG: dict | None = None


def emit(record: dict) -> dict:
    """One figure = one JSON line on stdout (flushed, so progress shows while the suite runs), tagged
    with the CPU it was measured on."""
    global _CPU_TAG
    _CPU_TAG = _CPU_TAG or cpu_tag()
    record.update({k: v for k, v in _CPU_TAG.items() if k not in record})
    record.setdefault("load_average", [round(x, 2) for x in os.getloadavg()])  # how busy the machine was
    print(json.dumps(record), flush=True)
    return record


def with_goal(record: dict, goal: str | None, met: bool | None) -> dict:
    """Attach the figure's goal; with --quick the sizes differ, so nothing is judged (met = None)."""
    record["goal"], record["met"] = goal, None if QUICK_RUN else met
    return record


def rnd(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


# ---- models --------------------------------------------------------------------------------------

def build_ours(cfg: dict, num_classes: int = 0, seed: int = 0):
    from rqtransformer import RQTransformer, RQTransformerConfig

    torch.manual_seed(seed)
    return RQTransformer(RQTransformerConfig(**cfg, num_classes=num_classes, dropout=0.0)).eval()


def build_reference(cfg: dict, seed: int = 0):
    """The reference package's RQTransformer with the same sizes (dim_head = dim / heads)."""
    from rq_transformer import RQTransformer as Reference

    h, w, D = cfg["code_shape"]
    torch.manual_seed(seed)
    return Reference(num_tokens=cfg["codebook_size"], dim=cfg["dim"], max_spatial_seq_len=h * w, depth_seq_len=D,
                     spatial_layers=cfg["spatial_layers"], depth_layers=cfg["depth_layers"],
                     dim_head=cfg["dim"] // cfg["heads"], heads=cfg["heads"]).eval()


def reference_top_k(codebook_size: int, filter_thres: float = 0.9) -> int:
    """The k the reference's top_k(filter_thres) keeps, so that ours samples from the same filter."""
    return max(int((1 - filter_thres) * codebook_size), 1)


def random_codes(cfg: dict, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["codebook_size"], (batch, *cfg["code_shape"]), generator=g)  # [B, h, w, D]


def run_main(figures_fn, args: argparse.Namespace) -> list[dict]:
    """Entry point of a script run alone (args from parse_args): machine line, then its figures."""
    emit(machine_info(args.quick))
    return figures_fn(args.quick)


if __name__ == "__main__":
    sys.exit("run a benchmark script, e.g. python -m bench.run --quick")
