"""A 16-px colour toy for checking that conditioning works: a circle or a square in a darker shade of one of
four background colours, scored by the image's dominant colour, and a tiny RQ-VAE fitted to such images in
seconds on a CPU. Used by the tests and by bench.text_vs_class (prompts against class labels)."""
from __future__ import annotations

import numpy as np
import torch

COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def colour_image(rgb: tuple[int, int, int], shape: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [16, 16, 3]: the colour (brightness jittered), with the shape at a random place in a darker shade,
    so that the image keeps one colour."""
    yy, xx = np.mgrid[:16, :16]
    a = np.empty((16, 16, 3))
    a[:] = np.array(rgb) * rng.uniform(0.85, 1.1)
    cy, cx = rng.integers(5, 11, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 9 if shape == "circle"
            else (abs(yy - cy) <= 2) & (abs(xx - cx) <= 2))
    a[mask] *= 0.6
    return a.clip(0, 255).astype(np.uint8)


def dominant_colour(images: torch.Tensor) -> torch.Tensor:
    """images [B,3,H,W] in [0,1] -> index into COLOURS [B]: the palette colour most pixels are nearest to."""
    palette = torch.tensor([*COLOURS.values()], dtype=torch.float) / 255
    nearest = torch.cdist(images.permute(0, 2, 3, 1).flatten(1, 2), palette[None]).argmin(-1)  # [B, H*W]
    return torch.stack([(nearest == k).sum(1) for k in range(len(COLOURS))], 1).argmax(1)


def fit_rqvae(model, images: torch.Tensor, steps: int, lr: float):
    """Fit an RQVAE to images [B,3,H,W] in [-1,1], full batch: L1 + commitment, AdamW. Returns it in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        recon, terms = model(images)
        loss = (recon - images).abs().mean() + terms["commitment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def colour_rqvae(images: torch.Tensor, steps: int, seed: int = 0):
    """The toy's RQ-VAE (2 codes deep, 16 codes), fitted to images. No attention, quantize dropout or dead-code
    restarts: faster, and steady over seeds at this size."""
    from rqvae import PRESETS, RQVAE, RQVAEConfig

    torch.manual_seed(seed)
    vae = RQVAE(RQVAEConfig(**{**PRESETS["tiny"], "code_depth": 2, "codebook_size": 16, "latent_dim": 8,
                               "mid_attention": False, "quantize_dropout": False, "threshold_ema_dead_code": 0.0}))
    return fit_rqvae(vae, images, steps, lr=1e-3)
