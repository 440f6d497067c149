"""Benchmarks against the reference package `rq-transformer==0.1.9` and the compute limit.

Run everything with `make bench` (= `.venv/bin/python -m bench.run`); each script also runs alone,
e.g. `python -m bench.sampling_speed --quick`. Every script prints one JSON object per figure.

Importing this package sets OMP_WAIT_POLICY=PASSIVE (unless already set) *before* torch is imported:
with OpenMP's default active (spinning) wait policy, the many tiny ops of sampling get catastrophically
slower whenever another process is using a core. Run the scripts with `python -m bench.<name>` (not as
file paths) so this happens first; `machine_info()` records whether torch was imported too early.
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TORCH_IMPORTED_BEFORE_BENCH = "torch" in sys.modules  # then the setting above came too late
