"""The GPU check on a machine without CUDA: one line, exit 0 (test_cuda.py checks that its tests skip)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these would run the whole GPU check")


def test_gpu_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], proc.stdout

