"""Pixels in: the images and masks RQPipeline takes, as tensors at the model's resolution."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rqcore.images import check_pixels, image_transform, mask_layer, to_rgb


def images_to_tensor(images, resolution: int) -> torch.Tensor:
    """PIL image(s), uint8 arrays [H,W,C] or float tensors [B,3,H,W] in [-1,1] -> [B,3,R,R] in [-1,1].

    Any size is accepted: images are resized (shorter side) and center-cropped to the model's
    resolution; any PIL mode is converted to RGB (transparency on white)."""
    items = images if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no image given")
    if torch.is_tensor(images):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"image tensors must be float [B,3,H,W] in [-1,1], got {tuple(x.shape)} {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"image tensor is empty: {tuple(x.shape)}")
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(x.float(), size=(resolution,) * 2, mode="bicubic", antialias=True,
                              align_corners=False)
        return x.clamp(-1, 1)
    transform = image_transform(resolution)
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise ValueError(f"image arrays must be uint8 [H,W] or [H,W,C], got {item.dtype} {item.shape}")
            item = Image.fromarray(item)
        if not isinstance(item, Image.Image):
            raise ValueError(f"expected a PIL image, a uint8 array or a tensor, got {type(item).__name__}")
        check_pixels(item.width, item.height, "image")  # before decoding: a lazily opened file is not read yet
        if min(item.size) < 1:
            raise ValueError("image is empty")
        out.append(transform(to_rgb(item)))
    return torch.stack(out)


def mask_to_keep(mask, resolution: int, downsample: int) -> torch.Tensor:
    """Pixel mask (white = regenerate) -> keep-mask over code positions [h,w] (True = keep)."""
    if torch.is_tensor(mask):
        mask = mask.detach().cpu().float().numpy()
    if isinstance(mask, np.ndarray):
        if mask.size == 0:
            raise ValueError(f"mask is empty: shape {mask.shape}")
        mask = mask.astype(np.float32)
        mask = mask * 255 if mask.max() <= 1 else mask  # 0/1 (or bool) masks: 1 = regenerate
        if mask.ndim == 3:
            mask = mask.max(-1) if mask.shape[-1] in (1, 3, 4) else mask[0]
        if mask.ndim != 2:
            raise ValueError(f"mask must be a single-channel image [H,W], got shape {mask.shape}")
        mask = Image.fromarray(mask.clip(0, 255).astype(np.uint8))
    if not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL image, an array or a tensor, got {type(mask).__name__}")
    check_pixels(mask.width, mask.height, "mask")  # before any decoding, as for images
    mask = mask_layer(mask)[0]
    grey = image_transform(resolution)(mask.convert("RGB"))[:1]  # [1,R,R] in [-1,1]
    # a low threshold: thin anti-aliased strokes get faint once resized, and still mean "regenerate"
    touched = F.max_pool2d((grey > -0.8).float()[None], downsample)[0, 0] > 0  # [h,w]: any painted pixel in the patch
    if not touched.any():
        if mask.getextrema()[1] > 25:  # painted, but lost to the crop (or too thin after resizing)
            raise ValueError(f"the painted region disappears when the image is resized and center-cropped "
                             f"to {resolution}x{resolution}: it lies outside the centre square "
                             f"or is too thin; paint a larger region nearer the centre")
        raise ValueError("the mask is empty: paint (white) the region to regenerate")
    return ~touched
