"""Images in and out: any PIL mode -> RGB (transparency on white), resize + center crop to [-1,1]
tensors, tensors -> PIL, and the one pixel limit every boundary enforces."""
from __future__ import annotations

import os

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs (> ~6300x6300)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def check_pixels(width: int, height: int, what: str = "image") -> None:
    """ValueError when a `what` of width x height exceeds MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} is too large ({width}x{height}); the limit is {MAX_IMAGE_PIXELS:,} pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (RGBA, LA, palette with alpha) is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray((arr / peak * 255).clip(0, 255).astype("uint8"), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def mask_layer(image: Image.Image) -> tuple[Image.Image, bool]:
    """The one mask rule: (L mask, painted). Strokes on a transparent layer are its alpha (painted=True);
    an opaque image is its brightness (painted=False), white = regenerate."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha, True
    return image.convert("RGB").convert("L"), False


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with a clear ValueError for unreadable or oversized files."""
    try:
        with Image.open(path) as im:
            check_pixels(im.width, im.height, str(path))  # PIL itself only refuses twice the limit
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: image is too large (limit {MAX_IMAGE_PIXELS:,} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def image_transform(resolution: int, hflip: bool = False) -> transforms.Compose:
    """PIL RGB -> float tensor [3,R,R] in [-1,1] (resize shorter side, center crop)."""
    steps = [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
             transforms.CenterCrop(resolution)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """float [B,3,H,W] in [-1,1] -> list of PIL RGB images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]
