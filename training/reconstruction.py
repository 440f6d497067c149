"""Reconstruction quality of an RQ-VAE at every code depth: what training logs and evaluation reports."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rqcore.metrics import psnr
from rqvae import RQVAE


@torch.no_grad()
def psnr_per_image(model: RQVAE, images: torch.Tensor, batch_size: int = 64,
                   desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N,3,R,R] -> (PSNR of each image's reconstruction at every depth 1..D [N,D], codes [N,h,w,D]);
    a progress bar titled `desc` if given."""
    D = model.config.code_depth
    psnrs, codes = [], []
    for chunk in tqdm(images.split(batch_size), desc=desc, disable=desc is None):
        c = model.encode(chunk)
        codes.append(c)
        psnrs.append(torch.stack([psnr(model.decode(c, depth=k), chunk) for k in range(1, D + 1)], 1).float().cpu())
    return torch.cat(psnrs), torch.cat(codes)


def depth_report(psnrs: torch.Tensor, codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """psnr_depth1..D (means of psnrs [N,D]) and codebook_usage (the share of codes that codes [N,h,w,D] use)."""
    out = {f"psnr_depth{k + 1}": float(v) for k, v in enumerate(psnrs.mean(0))}
    out["codebook_usage"] = codes.flatten().unique().numel() / codebook_size
    return out


def evaluate_depths(model: RQVAE, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """PSNR at every depth 1..D and codebook usage of `images` (model in eval mode)."""
    return depth_report(*psnr_per_image(model, images, batch_size), model.config.codebook_size)
