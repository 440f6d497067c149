"""Training data: ImageFolder trees checked up front (every image readable and within the pixel limit),
and the fixed validation images both stages show."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from rqcore.images import MAX_IMAGE_PIXELS, image_transform, load_image


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


def fixed_images(data_dir: str | os.PathLike, resolution: int, count: int) -> torch.Tensor:
    """A deterministic, evenly spread set of images [N,3,R,R] for validation grids and PSNR."""
    ds = image_folder(data_dir, resolution, check=False)
    idx = torch.linspace(0, len(ds) - 1, min(count, len(ds))).long().unique()
    return torch.stack([ds[i][0] for i in idx.tolist()])
