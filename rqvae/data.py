"""Image loading shared by both stages: ImageFolder trees, RGBA composited on white, [-1,1] tensors."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs (> ~6300x6300)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with a clear ValueError for unreadable or oversized files."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # PIL itself only refuses twice the limit
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
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


def image_folder(data_dir: str | os.PathLike, resolution: int, hflip: bool = False,
                 check: bool = True) -> ImageFolder:
    """An ImageFolder over `data_dir` (one sub-folder per class). Raises ValueError with one clear
    line for a missing folder, a tree without images, or (check=True) any unreadable image."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    try:
        ds = ImageFolder(str(root), transform=image_transform(resolution, hflip), loader=load_image)
    except FileNotFoundError:
        subdirs = [p for p in root.iterdir() if p.is_dir()]
        where = "has no class sub-folders" if not subdirs else "contains no images"
        raise ValueError(f"data folder {root} {where}: expected <root>/<class>/<image> with extensions "
                         f"{', '.join(IMG_EXTENSIONS[:6])}, ...") from None
    if check:
        for path, _ in ds.samples:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
                    with Image.open(path) as im:
                        width, height = im.size
                        if im.format == "PNG":
                            im.verify()  # checks every chunk's CRC without decoding
                        elif width * height <= MAX_IMAGE_PIXELS:
                            # verify() checks nothing in a JPEG: decode it (at 1/8 scale, which still
                            # reads every byte) so a truncated file is reported now, not mid-training
                            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                            im.load()
            except Image.DecompressionBombError:  # PIL refuses > 2x the limit before returning the image
                width = height = None
            except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
                raise ValueError(f"unreadable image {path}: {e.__class__.__name__}: {e}") from None
            if width is None or width * height > MAX_IMAGE_PIXELS:
                shown = f" ({width}x{height})" if width else ""
                raise ValueError(f"image {path} is too large{shown}; the limit is {MAX_IMAGE_PIXELS:,} pixels")
    return ds
