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


def train_tiny_vae(image_dir, code_depth=2, codebook_size=16, steps=150):
    """A tiny RQ-VAE fitted on the fixture images: enough for the second depth to matter."""
    from rqvae import PRESETS, RQVAE, RQVAEConfig
    from rqvae.data import image_folder

    torch.manual_seed(0)
    ds = image_folder(image_dir, 16)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    config = RQVAEConfig(**{**PRESETS["tiny"], "code_depth": code_depth, "codebook_size": codebook_size,
                            "latent_dim": 8})
    model = RQVAE(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        recon, terms = model(images)
        loss = (recon - images).abs().mean() + terms["commitment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), images


@pytest.fixture(scope="session")
def trained_tiny_vae(tmp_path_factory):
    return train_tiny_vae(make_image_folder(tmp_path_factory.mktemp("vae") / "images"))
