"""Fetch one of the paper's released models by name, convert it, and cache the pipeline folder.

    python -m official.fetch_official NAME [--cache_dir DIR] [--base_url URL] [--dtype float32|float16]
        [--force] [--keep_download]

NAME is one of RELEASES (ffhq, church, cat, bedroom, imagenet-480m ... cc3m-cc12m-yfcc). The last line printed
is the converted folder, so `RQPipeline.from_pretrained(fetch_official("ffhq"))` and
`python app.py --weights official:ffhq` both work; a second call finds it in the cache and uses no network.

- Cache: `--cache_dir`, else $RQ_CACHE, else $XDG_CACHE_HOME/rq-transformer/official (~/.cache/... without it).
  It holds NAME/ (NAME-float16/ with --dtype float16), downloads/ (partial and kept tarballs) and fid_stats/.
- URLs: each file is a (prefix, path) pair; the prefix is the release host or the official repository's raw
  GitHub files (the text models' BPE files). `--base_url URL` (default $RQ_OFFICIAL_BASE_URL) replaces both,
  so a mirror serves URL/models/RQVAE/<hash>/ffhq.tar.gz and URL/rqvae/txtimg_datasets/tokenizers/....
- An interrupted download resumes (HTTP Range) on the next call; free space for the download plus 2x its size
  (unpacking, converting) is checked first. Only stage{1,2}/{model.pt,config.yaml} are taken from the tarball,
  wherever it nests them; links, absolute paths and '..' refuse the whole tarball. The tarball is deleted
  once converted (kept with --keep_download); the sha256 of every downloaded file goes into the model card.

The weights are CC-BY-NC-SA 4.0: non-commercial use only.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .download import BadArchive, download, extract, sha256

RELEASE_HOST = "https://twg.kakaocdn.net/brainrepo/"
# the official repository at the commit the parity fixtures were made from (its files never move)
GITHUB_RAW = ("https://raw.githubusercontent.com/kakaobrain/rq-vae-transformer/"
              "341395e562ac347f5eb62db9f5f08b9f2cc42a60/")
BPE_PATH = "rqvae/txtimg_datasets/tokenizers/pretrained/"
FID_STATS_PATH = "etc/RQVAE/8b325b628f49bf60a3094fcf9419398c/fid_stats.tar.gz"
STAGE_FILES = ("stage1/model.pt", "stage1/config.yaml", "stage2/model.pt", "stage2/config.yaml")
MIRROR_HINT = ": check the network, or point --base_url (or $RQ_OFFICIAL_BASE_URL) at a mirror of the same paths"
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Release:
    path: str  # under RELEASE_HOST
    params: str  # stage 2's size, as the official README gives it
    fid: float | None  # the official README's FID (None: not given)
    text: bool = False  # text-to-image: also needs the BPE files


def _model(hash_: str, file: str) -> str:
    return f"models/RQVAE/{hash_}/{file}"


RELEASES = {
    "ffhq": Release(_model("d47570aeff6ba300735606a806f54663", "ffhq.tar.gz"), "355M", 10.38),
    "church": Release(_model("deeb3e0ac6e09923754e3e594ede7b01", "church.tar.gz"), "370M", 7.45),
    "cat": Release(_model("92b4e6a9ace09c9ab8ff9d3b3e688367", "cat.tar.gz"), "612M", 8.64),
    "bedroom": Release(_model("06b72c164cd2fe64fc8ebd6b42b0040f", "bedroom.tar.gz"), "612M", 3.04),
    "imagenet-480m": Release(_model("7518a004fe39120fcffbba76005dc6c3", "imagenet_480M.tar.gz"), "480M", 15.72),
    "imagenet-821m": Release(_model("dcd39292319104da5577dec3956bfdcc", "imagenet_821M.tar.gz"), "821M", 13.11),
    "imagenet-1.4b": Release(_model("f5cf4e5f3f0b5088d52cbb5e85c1077f", "imagenet_1.4B.tar.gz"), "1.4B", 11.56),
    "imagenet-1.4b-rqvae-50e": Release(_model("6714b47bb9382076923590eff08b1ee5", "imagenet_1.4B_rqvae_50e.tar.gz"),
                                       "1.4B", 8.71),
    "imagenet-3.8b-rqvae-50e": Release(_model("e1ee2fef2928f7fd31f53a8348f08b88", "imagenet_3.8B_rqvae_50e.tar.gz"),
                                       "3.8B", 7.55),
    "cc3m": Release(_model("dcd95e8f08408e113aab6451fae895f5", "cc3m.tar.gz"), "654M", 12.33, text=True),
    "cc3m-cc12m-yfcc": Release(_model("3a8429cd7ec0e0f2b66fca94804c79d5", "cc3m_cc12m_yfcc.tar.gz"), "3.9B", None,
                               text=True),
}
FID_STATS_KEYS = ("imagenet_256_train", "ffhq_256_train", "lsun_256_bedroom", "lsun_256_cat", "lsun_256_church",
                  "cc3m_256_val", "coco_256_val")
FID_STATS_OF_RELEASE = {
    "ffhq": "ffhq_256_train", "church": "lsun_256_church", "cat": "lsun_256_cat", "bedroom": "lsun_256_bedroom",
    **{n: "imagenet_256_train" for n in RELEASES if n.startswith("imagenet-")},
    **{n: "cc3m_256_val" for n in RELEASES if n.startswith("cc3m")},
}


def release_url(prefix: str, path: str, base_url: str | None = None) -> str:
    """prefix + path, or base_url + path where a mirror (or a test server) replaces every prefix."""
    return (base_url.rstrip("/") + "/" if base_url else prefix) + path


def default_cache_dir() -> Path:
    if os.environ.get("RQ_CACHE"):
        return Path(os.environ["RQ_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rq-transformer" / "official"


def get_release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}: choose one of {', '.join(RELEASES)}")
    return RELEASES[name]


def stats_name(ref: str) -> str:
    """A release name (e.g. 'ffhq') or a stats key (e.g. 'ffhq_256_train') -> the stats key."""
    if ref in FID_STATS_KEYS:
        return ref
    if ref in FID_STATS_OF_RELEASE:
        return FID_STATS_OF_RELEASE[ref]
    raise ValueError(f"no FID statistics for {ref!r}: give a release ({', '.join(FID_STATS_OF_RELEASE)}) "
                     f"or a statistics file ({', '.join(FID_STATS_KEYS)})")


def _base(base_url: str | None) -> str | None:
    return base_url or os.environ.get("RQ_OFFICIAL_BASE_URL") or None


def _fetch_tarball(url: str, tarball: Path, progress: bool, force: bool) -> Path:
    """The tarball in downloads/: one that is already there is complete (it is renamed only once it is)."""
    if force:
        for stale in (tarball, tarball.with_name(tarball.name + ".part")):
            stale.unlink(missing_ok=True)
    if tarball.is_file():
        return tarball
    return download(url, tarball, progress=progress, hint=MIRROR_HINT)


def _unpack(tarball: Path, wanted: tuple[str, ...], out: Path, required: tuple[str, ...] | None = None) -> None:
    try:
        extract(tarball, wanted, out, required)
    except BadArchive as e:
        tarball.unlink(missing_ok=True)  # a re-download is the only fix: don't keep a bad file
        raise ValueError(f"{e}; the download was removed, nothing was cached") from None


def fetch_tokenizer(stage2: Path, out: Path, base_url: str | None, progress: bool) -> list[tuple[str, str, str]]:
    """The BPE files stage 2's config.yaml names, from the official repository into `out`
    -> [(file, url, sha256)]."""
    from . import layout

    name = (layout.read_yaml(stage2).get("dataset") or {}).get("txt_tok_name", "bpe16k_huggingface")
    if name not in layout.TOKENIZER_FILES:
        raise ValueError(f"stage 2's config.yaml names the tokenizer {name!r}; only {sorted(layout.TOKENIZER_FILES)} "
                         "are known")
    rows = []
    for suffix in ("-vocab.json", "-merges.txt"):
        file = layout.TOKENIZER_FILES[name] + suffix
        url = release_url(GITHUB_RAW, BPE_PATH + file, base_url)
        rows.append((file, url, sha256(download(url, out / file, progress=progress, hint=MIRROR_HINT))))
    return rows


def append_downloads(card: Path, rows: list[tuple[str, str, str]]) -> None:
    """The model card the converter wrote, plus where each downloaded file came from and its sha256."""
    table = ["", "## Downloaded files", "", "Fetched by `python -m official.fetch_official`:", "",
             "| file | URL | sha256 |", "|---|---|---|", *(f"| `{f}` | {u} | `{s}` |" for f, u, s in rows), ""]
    card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(table), encoding="utf-8")


def _convert(src: Path, out: Path, tokenizer: Path | None, dtype: str, tarball: Path) -> None:
    from .convert import main as convert

    args = ["--rqvae", str(src / "stage1"), "--rqtransformer", str(src / "stage2"), "--output_dir", str(out),
            "--dtype", dtype] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout's last line is the folder
            convert(args)
    except ValueError as e:
        tarball.unlink(missing_ok=True)  # its contents are refused: keeping it would only cost disk
        raise ValueError(f"{tarball.name}: {e}; the download was removed, nothing was cached") from None


def fetch_official(name: str, cache_dir=None, base_url: str | None = None, dtype: str = "float32",
                   progress: bool = True, force: bool = False, keep_download: bool = False) -> Path:
    """The converted pipeline folder of release `name`, from the cache, else downloaded and converted."""
    release = get_release(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache / (name if dtype == "float32" else f"{name}-{dtype}")
    if (folder / "pipeline.json").is_file() and not force:
        return folder  # written by a rename only once complete: no network needed
    base = _base(base_url)
    url = release_url(RELEASE_HOST, release.path, base)
    tarball = _fetch_tarball(url, cache / "downloads" / f"{name}.tar.gz", progress, force)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{folder.name}."))
    try:  # everything is built in `work`, then renamed: a failure leaves no half folder
        _unpack(tarball, STAGE_FILES, work / "release")
        rows = [(tarball.name, url, sha256(tarball))]
        tokenizer = work / "tokenizer" if release.text else None
        if tokenizer:
            rows += fetch_tokenizer(work / "release" / "stage2", tokenizer, base, progress)
        _convert(work / "release", work / "out", tokenizer, dtype, tarball)
        append_downloads(work / "out" / "README.md", rows)
        if folder.exists():
            shutil.rmtree(folder)
        (work / "out").rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_download:
        tarball.unlink(missing_ok=True)
    return folder


def _check_stats(file: Path) -> None:
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as data:
            keys = set(data.files)
    except (OSError, ValueError) as e:
        raise BadArchive(f"{file.name} is not a readable .npz ({e})") from None
    if not {"mu", "sigma"} <= keys:
        raise BadArchive(f"{file.name} has no 'mu' and 'sigma' (it has {sorted(keys)})")


def fid_stats_file(dataset: str, cache_dir=None, base_url: str | None = None, progress: bool = True) -> Path:
    """The official FID statistics (.npz with mu, sigma) of `dataset` (a stats key or a release name), from
    CACHE/fid_stats/, else fetched with the others in fid_stats.tar.gz."""
    key = stats_name(dataset)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stats = cache / "fid_stats"
    if (stats / f"{key}.npz").is_file():
        return stats / f"{key}.npz"
    url = release_url(RELEASE_HOST, FID_STATS_PATH, _base(base_url))
    cache.mkdir(parents=True, exist_ok=True)
    tarball = _fetch_tarball(url, cache / "downloads" / "fid_stats.tar.gz", progress, force=False)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".fid_stats."))
    try:
        _unpack(tarball, tuple(f"{k}.npz" for k in FID_STATS_KEYS), work, required=(f"{key}.npz",))
        try:
            _check_stats(work / f"{key}.npz")
        except BadArchive as e:
            tarball.unlink(missing_ok=True)
            raise ValueError(f"{tarball.name}: {e}; the download was removed") from None
        stats.mkdir(parents=True, exist_ok=True)
        for file in sorted(work.glob("*.npz")):
            os.replace(file, stats / file.name)  # each file appears whole
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tarball.unlink(missing_ok=True)
    return stats / f"{key}.npz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"the release: {', '.join(RELEASES)}")
    p.add_argument("--cache_dir", help="where to cache (default: $RQ_CACHE, else $XDG_CACHE_HOME/rq-transformer/"
                                       "official or ~/.cache/rq-transformer/official)")
    p.add_argument("--base_url", help="a mirror replacing the release host and the GitHub prefix (default: "
                                      "$RQ_OFFICIAL_BASE_URL)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the transformer's stored weights (as convert)")
    p.add_argument("--force", action="store_true", help="download and convert again, even if cached")
    p.add_argument("--keep_download", action="store_true", help="keep the tarball in CACHE/downloads/ once converted")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    get_release(args.name)  # a bad name: one line listing the valid ones, before anything else
    folder = fetch_official(args.name, cache_dir=args.cache_dir, base_url=args.base_url, dtype=args.dtype,
                            force=args.force, keep_download=args.keep_download)
    print(folder)


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli(main)
