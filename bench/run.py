"""Run every benchmark: one JSON line per figure on stdout, all of them in bench/results.json.

    make bench                               # = .venv/bin/python -m bench.run (installs bench/requirements.txt)
    .venv/bin/python -m bench.run --quick    # tiny sizes, a minute: checks the suite (writes no file by default)
    .venv/bin/python -m bench.run --only sampling training --threads 2 --out /tmp/results.json
    .venv/bin/python -m bench.run --only app --app-weights /path/to/pipeline
    .venv/bin/python -m bench.run --only official --official DIR   # vs the official sampler (DIR: its source tree)

Method: one process, same configuration and thread count for ours and the reference,
warm-up excluded, median of >= 3 repeats (time.perf_counter). OMP_WAIT_POLICY=PASSIVE is set before
torch is imported (bench/__init__.py); the thread count and the load average at start are recorded
in the "machine" record: compare runs only on an otherwise idle machine. About 5-10 minutes on 2 cores.
"""
if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module so bench/__init__ goes first
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, [sys.executable, "-m", "bench.run", *sys.argv[1:]], env)

import json
import time
from pathlib import Path

from bench import app_latency, load_test, precision, sampling_speed, training, vs_official
from bench.common import emit, machine_info, parse_args

SECTIONS = {"sampling": sampling_speed.figures, "training": training.figures, "app": app_latency.figures,
            "load": load_test.figures, "official": vs_official.figures, "precision": precision.figures}
OPTIONS = {"app": lambda a: {"weights": a.app_weights},  # extra keyword arguments per section
           "load": lambda a: {"weights": a.app_weights}, "official": lambda a: {"tree": a.official}}
DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
        p.add_argument("--out", type=Path, default=None,
                       help=f"results file (default: {DEFAULT_OUT.name} beside this script; none with --quick)")
        p.add_argument("--app-weights", default=app_latency.OPTIONS["weights"], help="pipeline folder for app.py")
        p.add_argument("--official", default=None, help=f"official source tree for the official section "
                                                        f"(default: ${vs_official.ENV}; skipped without one)")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    t0 = time.perf_counter()
    results = {"machine": emit(machine_info(args.quick)), "figures": []}
    for name in args.only:
        t = time.perf_counter()
        results["figures"] += SECTIONS[name](args.quick, **OPTIONS.get(name, lambda a: {})(args))
        results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    goals = [f for f in results["figures"] if f.get("met") is not None]
    results["goals_met"] = f"{sum(f['met'] for f in goals)}/{len(goals)}"
    emit({"figure": "summary", "total_seconds": results["total_seconds"], "goals_met": results["goals_met"],
          "section_seconds": results["section_seconds"]})
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
