"""Shared fixtures: tiny ImageFolder trees made on disk, tiny configs."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

if "OMP_NUM_THREADS" not in os.environ:  # let a developer share the cores with a training run
    torch.set_num_threads(2)


def make_image_folder(root, classes=("circles", "squares"), per_class=8, size=20, seed=0):
    """RGBA shapes on transparent backgrounds, one colour family per class."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.zeros((size, size, 4), np.uint8)
            a[..., ci % 3] = 200
            a[..., (ci + 1) % 3] = rng.integers(0, 255)
            lo, hi = rng.integers(2, size // 2), rng.integers(size // 2 + 2, size - 1)
            if ci % 2:
                a[lo:hi, lo:hi, 3] = 255
            else:
                yy, xx = np.mgrid[:size, :size]
                a[..., 3] = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (hi - lo) ** 2 / 2) * 255
            Image.fromarray(a, "RGBA").save(root / name / f"{i}.png")
    return root


@pytest.fixture
def image_dir(tmp_path):
    return make_image_folder(tmp_path / "images")
