"""Hugging Face `datasets` data for both training scripts, taken the way diffusers' training scripts take it:
--dataset_name (a Hub id, or a local parquet file, folder of parquet files, imagefolder folder or folder
written by save_to_disk), --dataset_config_name, --dataset_split, --image_column, --caption_column,
--label_column, --max_train_samples, --cache_dir. A split becomes the dataset a folder gives: items
(image, class) like an ImageFolder, or (image, class, caption) as a CaptionedImageFolder, so the scripts
treat both alike. Images are decoded by load_image, exactly as files in a folder are."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch.utils.data import Dataset

from rqcore.checks import is_whole
from rqcore.images import image_transform, load_image

from .data import CaptionedImageFolder, any_image_folder, check_images, fixed_images, spread_images


class _Bytes(io.BytesIO):
    """An encoded image held in a row: load_image and check_images name it (by str()) in their messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


class _Rows:
    """The rows' images: `.table` holds the image column undecoded ({"bytes", "path"} cells)."""

    def _source(self, row: int, cell: dict | None = None):
        cell = cell if cell is not None else self.table[row][self.image_column]
        if cell and cell.get("bytes"):
            return _Bytes(cell["bytes"], f"{self.root} row {row}")
        if cell and cell.get("path"):
            return cell["path"]
        raise ValueError(f"{self.root} row {row}: column '{self.image_column}' holds no image")

    def _load(self, row: int):
        return load_image(self._source(row))  # RGB, transparency on white, the pixel limit


class HubImageFolder(_Rows, Dataset):
    """Items (image [3,R,R], class index) like an ImageFolder; `.samples` are (row, class)."""

    def __init__(self, table, image_column: str, root: str, classes: list[str], targets: list[int],
                 resolution: int, hflip: bool, fingerprint: str):
        self.table, self.image_column, self.root, self.fingerprint = table, image_column, root, fingerprint
        self.classes, self.class_to_idx = classes, {c: i for i, c in enumerate(classes)}
        self.samples, self.targets = list(enumerate(targets)), list(targets)
        self.transform, self.loader = image_transform(resolution, hflip), self._load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row, target = self.samples[i]
        return self.transform(self.loader(row)), target


class CaptionedHubImageFolder(_Rows, CaptionedImageFolder):
    """Items (image, class index, caption): a CaptionedImageFolder whose samples are (row, class)."""

    def __init__(self, table, image_column: str, root: str, classes: list[str], targets: list[int],
                 captions: list[str], resolution: int, hflip: bool, fingerprint: str):
        super().__init__(root, classes, list(enumerate(targets)), captions, resolution, hflip)
        self.table, self.image_column, self.fingerprint = table, image_column, fingerprint
        self.loader = self._load  # CaptionedImageFolder.__getitem__ calls loader(row)


def load_split(name: str, config: str | None, split: str, cache_dir: str | None, flag: str = "--dataset_split"):
    """One split of --dataset_name as a datasets.Dataset; every failure is one ValueError line."""
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset_name needs the datasets package: pip install 'datasets>=4'") from None
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".parquet")
    if not path.exists() and looks_local:
        raise ValueError(f"--dataset_name {name}: no such file or folder (a Hub id is <user>/<name>)")
    if path.is_file() and path.suffix != ".parquet":
        raise ValueError(f"--dataset_name {name}: a single file must be .parquet (or pass its folder)")
    try:
        if (path / "dataset_dict.json").is_file() and (path / split / "state.json").is_file():
            return datasets.load_from_disk(str(path / split))  # only this split: another may be empty
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise ValueError(f"Unknown split \"{split}\". Should be one of {list(saved)}.")
                return saved[split]
            if split != str(saved.split or "train"):
                raise ValueError(f"Unknown split \"{split}\". Should be one of ['{saved.split or 'train'}'].")
            return saved
        if path.is_file():
            return datasets.load_dataset("parquet", data_files={"train": str(path)}, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except datasets.exceptions.DatasetNotFoundError:
        raise ValueError(f"--dataset_name {name}: neither a local folder nor a dataset on the Hub (a "
                         "private or gated one needs a login token)") from None
    except ConnectionError:
        offline = " (offline mode: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" * bool(datasets.config.HF_HUB_OFFLINE)
        raise ValueError(f"--dataset_name {name}: not a local folder, and the Hugging Face Hub is unreachable"
                         f"{offline}; pass a local folder, or load it once online so that it is cached") from None
    except FileNotFoundError as e:
        raise ValueError(f"--dataset_name {name}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "corresponds to no data" in str(e):  # datasets' words for a split without rows
            raise ValueError(f"--dataset_name {name} split {split} is empty") from None
        what = f"{flag} {split}" if "split" in str(e).lower() else f"--dataset_name {name}"
        raise ValueError(f"{what}: {str(e).splitlines()[0]}") from None
    except IndexError:  # datasets' words for a saved split without rows
        raise ValueError(f"--dataset_name {name} split {split} is empty") from None
    except RuntimeError as e:  # e.g. "Dataset scripts are no longer supported"
        raise ValueError(f"--dataset_name {name}: {str(e).splitlines()[0]}") from None
    except datasets.exceptions.DatasetsError as e:  # e.g. a file that is not parquet: the cause says why
        why = e.__cause__ or e
        raise ValueError(f"--dataset_name {name}: {type(why).__name__}: {str(why).splitlines()[0]}") from None


def hub_dataset(args, resolution: int, split: str, need_captions: bool = False, limit: int | None = None,
                hflip: bool = False, check: bool = True) -> HubImageFolder | CaptionedHubImageFolder:
    """A split of --dataset_name: captioned when it has the --caption_column (default 'text', then optional;
    given or `need_captions`, required), classes from --label_column (a ClassLabel's names, else the sorted
    distinct values), none without one. `limit` (--max_train_samples) keeps that many rows as diffusers does:
    shuffle(seed=--seed), then the first `limit`. check: every image opened once, before training."""
    flag = "--dataset_split" if split == args.dataset_split else "--validation_split"
    ds = load_split(args.dataset_name, args.dataset_config_name, split, args.cache_dir, flag)
    import datasets  # installed: load_split says so otherwise
    where = f"--dataset_name {args.dataset_name} split {split}"
    if len(ds) == 0:
        raise ValueError(f"{where} is empty")
    columns = ds.column_names
    shown = ", ".join(columns)
    caption_column = args.caption_column or "text"
    wanted = [("--image_column", args.image_column), ("--label_column", args.label_column)]
    if args.caption_column or need_captions:
        wanted.append(("--caption_column", caption_column))
    for option, column in wanted:
        if column is not None and column not in columns:
            raise ValueError(f"{where} has no column '{column}' ({option}); its columns: {shown}")
    # the default 'text' column counts as captions only where it holds strings (it may be something else)
    captioned = caption_column in columns and (
        bool(args.caption_column) or need_captions
        or getattr(ds.features[caption_column], "dtype", None) in ("string", "large_string"))
    if limit is not None and limit < len(ds):
        ds = ds.shuffle(seed=args.seed).select(range(limit))
    feature = ds.features[args.image_column]  # an Image, or the {bytes, path} struct other tools write
    if not (isinstance(feature, datasets.Image) or isinstance(feature, dict) and "bytes" in feature):
        raise ValueError(f"{where}: column '{args.image_column}' is not an image column ({feature}); "
                         "pass --image_column")
    table = ds.select_columns([args.image_column]).cast_column(args.image_column, datasets.Image(decode=False))
    classes, targets = [], [0] * len(ds)
    if args.label_column:
        feature, values = ds.features[args.label_column], list(ds[args.label_column])
        if any(v is None or (is_whole(v) and v < 0) for v in values):
            raise ValueError(f"{where}: --label_column '{args.label_column}' has rows without a label")
        if isinstance(feature, datasets.ClassLabel):
            classes, targets = list(feature.names), values
        elif not all(isinstance(v, (str, int)) for v in values) or len({type(v) for v in values}) > 1:
            raise ValueError(f"{where}: --label_column '{args.label_column}' must hold strings or whole numbers "
                             f"(one kind), got {feature}")
        else:  # plain strings or ints: their sorted distinct values are the class names
            names = sorted(set(values))
            index = {v: i for i, v in enumerate(names)}
            classes, targets = [str(v) for v in names], [index[v] for v in values]
    fingerprint = (f"{ds._fingerprint}|image={args.image_column}|caption={caption_column if captioned else None}"
                   f"|label={args.label_column}|split={split}|max={limit}")
    common = dict(resolution=resolution, hflip=hflip, fingerprint=fingerprint)
    if captioned:
        captions = list(ds[caption_column])
        for row, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{where} row {row}: caption '{caption_column}' must be a non-empty string, "
                                 f"got {caption!r:.60}")
        out = CaptionedHubImageFolder(table, args.image_column, args.dataset_name, classes, targets, captions, **common)
    else:
        out = HubImageFolder(table, args.image_column, args.dataset_name, classes, targets, **common)
    if check:  # each image opened once (PNG chunks verified, JPEG decoded at 1/8): a bad row stops the run now
        check_images(out._source(row, cell) for row, cell in enumerate(table[args.image_column]))
    return out


def train_data(args, resolution: int, caption_column: str = "text"):
    """The training set: --data_dir's folder, or --dataset_split of --dataset_name (--max_train_samples rows)."""
    if args.data_dir:
        return any_image_folder(args.data_dir, resolution, caption_column)
    return hub_dataset(args, resolution, args.dataset_split, limit=args.max_train_samples)


def validation_images(args, train_set, resolution: int, count: int, caption_column: str = "text") -> torch.Tensor:
    """Stage 1's fixed validation images [N,3,R,R], spread evenly: --validation_split, --validation_dir, else
    the training set (each image once)."""
    if args.validation_split:
        ds = hub_dataset(args, resolution, args.validation_split, check=False)
    elif args.validation_dir or args.data_dir:
        return fixed_images(args.validation_dir or args.data_dir, resolution, count, caption_column)
    else:
        ds = train_set
    return spread_images(ds, count)
