"""Training data: ImageFolder trees checked up front (every image readable and within the pixel limit),
captioned folders (the Hugging Face layout: a metadata.jsonl at the root), and the fixed validation
images both stages show."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from rqcore.images import MAX_IMAGE_PIXELS, image_transform, load_image

METADATA = "metadata.jsonl"


def image_folder(data_dir: str | os.PathLike, resolution: int, hflip: bool = False,
                 check: bool = True) -> ImageFolder:
    """An ImageFolder over `data_dir` (one sub-folder per class), or over the images at its root, without
    classes, where no sub-folder holds images. Raises ValueError with one clear line for a missing folder, a
    tree without images, or (check=True) any unreadable image."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    try:
        ds = ImageFolder(str(root), transform=image_transform(resolution, hflip), loader=load_image)
    except FileNotFoundError:  # no sub-folder holds images: the images at the root, if any, have no classes
        try:
            ds = FlatImageFolder(str(root), transform=image_transform(resolution, hflip), loader=load_image)
        except FileNotFoundError:
            raise ValueError(f"data folder {root} contains no images: expected <root>/<image> (no classes) or "
                             f"<root>/<class>/<image>, with extensions {', '.join(IMG_EXTENSIONS[:6])}, ...") from None
    if check:
        check_images(path for path, _ in ds.samples)
    return ds


class FlatImageFolder(ImageFolder):
    """The images at a folder's root, without classes (`classes` is empty, every target 0): what an
    unconditional model trains on, e.g. a folder of faces for the converted FFHQ model."""

    def find_classes(self, directory):
        return [], {}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        files = sorted(p for p in Path(directory).iterdir()
                       if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"no images in {directory}")
        return [(str(p), 0) for p in files]


def check_images(paths) -> None:
    """Open every image once, up front: ValueError naming the first unreadable or oversized file, so a
    bad file stops the run now instead of mid-training."""
    for path in paths:
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


def has_captions(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` is a captioned folder (it has a metadata.jsonl at its root)."""
    return (Path(data_dir) / METADATA).is_file()


class CaptionedImageFolder(Dataset):
    """Items (image [3,R,R], class index, caption). `.samples` [(path, class)] and `.captions` are aligned,
    so every caption can be tokenized and hashed before any image is encoded. An image with several
    rows in metadata.jsonl is several samples, one per caption (COCO-style multi-captions)."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], captions: list[str],
                 resolution: int, hflip: bool):
        self.root, self.classes, self.samples, self.captions = str(root), classes, samples, captions
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [t for _, t in samples]
        self.transform, self.loader = image_transform(resolution, hflip), load_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, target = self.samples[i]
        return self.transform(self.loader(path)), target, self.captions[i]

    def images(self) -> tuple[CaptionedImageFolder, torch.Tensor]:
        """(this folder with each image file once (with its first caption), for every sample the index
        of its image there [N]): encode each file once, however many captions it has."""
        where, first = {}, []
        for i, (path, _) in enumerate(self.samples):
            if path not in where:
                where[path] = len(first)
                first.append(i)
        distinct = copy.copy(self)
        distinct.samples = [self.samples[i] for i in first]
        distinct.captions = [self.captions[i] for i in first]
        distinct.targets = [t for _, t in distinct.samples]
        return distinct, torch.tensor([where[path] for path, _ in self.samples], dtype=torch.long)


def metadata_rows(meta: Path, caption_column: str = "text") -> list[tuple[int, dict]]:
    """metadata.jsonl -> [(line number, row object)], blank lines skipped; a line that is not UTF-8, not JSON
    or not an object is one ValueError line."""
    rows = []
    for n, raw in enumerate(meta.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{meta} line {n}: not UTF-8 text") from None
        if not line:
            continue  # blank lines (a trailing newline, spacing) carry no row
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{meta} line {n}: expected a JSON object {{\"file_name\": ..., "
                             f"\"{caption_column}\": ...}}, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def _read_metadata(meta: Path, caption_column: str) -> list[tuple[int, str, str]]:
    """metadata.jsonl -> [(line number, file_name, caption)]; the first bad row is one ValueError line."""
    rows = []
    for n, row in metadata_rows(meta, caption_column):
        columns = ", ".join(row) or "none"
        if "file_name" not in row:
            raise ValueError(f"{meta} line {n}: column 'file_name' is missing (columns: {columns})")
        if caption_column not in row:
            raise ValueError(f"{meta} line {n}: caption column '{caption_column}' is missing (columns: {columns}); "
                             "pass --caption_column")
        name, caption = row["file_name"], row[caption_column]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{meta} line {n}: file_name must be a non-empty string, got {name!r:.60}")
        if not isinstance(caption, str):
            raise ValueError(f"{meta} line {n}: caption '{caption_column}' must be a string, "
                             f"got {json.dumps(caption)[:60]}")
        if not caption.strip():
            raise ValueError(f"{meta} line {n}: caption '{caption_column}' of {name} is empty")
        rows.append((n, name, caption))
    if not rows:
        raise ValueError(f"{meta} has no rows: expected one JSON object per line with file_name and "
                         f"'{caption_column}'")
    return rows


def captioned_image_folder(data_dir: str | os.PathLike, resolution: int, caption_column: str = "text",
                           hflip: bool = False, check: bool = True) -> CaptionedImageFolder:
    """A captioned folder: images (in class sub-folders, which give class labels as in image_folder, or
    all at the root: no classes, class index 0) and a metadata.jsonl at the root, one JSON object per
    line: {"file_name": path relative to the root, <caption_column>: caption}. Every image must have a
    row: images without one are refused (their count and the first one named), not trained on silently
    uncaptioned. Bad rows, missing files and (check=True) unreadable images are one ValueError line,
    all found before any image is encoded."""
    root = Path(data_dir)
    meta = root / METADATA
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    if not meta.is_file():
        raise ValueError(f"data folder {root} has no {METADATA}: expected one JSON object per line with "
                         f"file_name and '{caption_column}'")
    if not isinstance(caption_column, str) or not caption_column or caption_column == "file_name":
        raise ValueError(f"--caption_column must name the caption column, got {caption_column!r}")
    rows = _read_metadata(meta, caption_column)
    # the images on disk, found exactly as image_folder finds them (so both stages see one set)
    classes = find_classes(root)[0] if any(p.is_dir() for p in root.iterdir()) else []
    if classes:
        try:
            found = make_dataset(root, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)
        except FileNotFoundError as e:
            raise ValueError(f"data folder {root}: {e}") from None
    else:
        found = [(str(p), 0) for p in sorted(root.iterdir()) if has_file_allowed_extension(p.name, IMG_EXTENSIONS)]
    on_disk = {os.path.normpath(os.path.relpath(path, root)): (path, target) for path, target in found}
    order = {rel: i for i, rel in enumerate(on_disk)}
    listed = []  # (disk order, line, rel, caption)
    for n, name, caption in rows:
        rel = os.path.normpath(name)
        if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
            raise ValueError(f"{meta} line {n}: file_name {name!r} must be a path inside {root}")
        if rel not in on_disk:
            path = root / rel
            if not path.exists():
                why = "does not exist"
            elif not path.is_file() or not has_file_allowed_extension(path.name, IMG_EXTENSIONS):
                why = f"is not an image file ({', '.join(IMG_EXTENSIONS[:6])}, ...)"
            else:  # an image at the root while the folder has class sub-folders
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                why = f"is not inside a class sub-folder ({shown})"
            raise ValueError(f"{meta} line {n}: file_name {name!r} {why}")
        listed.append((order[rel], n, rel, caption))
    missing = sorted(set(on_disk) - {rel for _, _, rel, _ in listed}, key=order.get)
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {root} have no row in {METADATA} (first: {missing[0]}); "
                         "every image needs a caption: add rows for them or move them out of the folder")
    listed.sort()  # image_folder's order (class, then path), rows of one image in file order
    samples = [on_disk[rel] for _, _, rel, _ in listed]
    if check:
        check_images(dict.fromkeys(path for path, _ in samples))  # each file once, even with several captions
    return CaptionedImageFolder(root, classes, samples, [c for *_, c in listed], resolution, hflip)


def any_image_folder(data_dir: str | os.PathLike, resolution: int, caption_column: str = "text",
                     hflip: bool = False, check: bool = True) -> ImageFolder | CaptionedImageFolder:
    """captioned_image_folder when `data_dir` has a metadata.jsonl (its images then may sit at the root),
    else image_folder."""
    if has_captions(data_dir):
        return captioned_image_folder(data_dir, resolution, caption_column, hflip, check)
    return image_folder(data_dir, resolution, hflip, check)


def fixed_images(data_dir: str | os.PathLike, resolution: int, count: int,
                 caption_column: str = "text") -> torch.Tensor:
    """A deterministic, evenly spread set of images [N,3,R,R] for validation grids and PSNR (each
    file once in a captioned folder)."""
    return spread_images(any_image_folder(data_dir, resolution, caption_column, check=False), count)


def spread_images(ds, count: int) -> torch.Tensor:
    """`count` images [N,3,R,R] spread evenly over a data set (each file once in a captioned one)."""
    ds = ds.images()[0] if isinstance(ds, CaptionedImageFolder) else ds
    idx = torch.linspace(0, len(ds) - 1, min(count, len(ds))).long().unique()
    return torch.stack([ds[i][0] for i in idx.tolist()])
