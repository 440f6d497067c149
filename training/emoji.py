"""Build the emoji demo set: an ImageFolder tree of 64 px emoji, by category, with a fixed test split.

    python -m training.emoji --out data/emoji [--version 16.0.0] [--styles google,twitter]
                          [--skin_tones | --no-skin_tones] [--cache_dir DIR] [--overwrite]

Fetches the npm packages emoji-datasource-<style> with `npm pack` (needs Node.js/npm), reads
package/emoji.json and package/img/<style>/64/*.png, drops the "Component" category (bare skin-tone
swatches), composites RGBA on white and writes RGB PNGs to

    <out>/{train,test}/<category>/<style>_<image>.png     plus categories.json and manifest.json

An emoji is held out (test) when zlib.crc32(unified.encode()) % 100 < 10, `unified` being the BASE
emoji's code, so all its styles and skin variations share a split. Skin-tone variations are OFF by
default: they differ from the base emoji only in skin colour and would make "People & Body" ~8x
larger than any other class (2261 vs 270 per style in 16.0.0); --skin_tones includes them.

Licences: emoji-datasource is MIT; Google Noto Emoji images are Apache-2.0; Twemoji images are
CC-BY 4.0 by Twitter, Inc and other contributors (credit them when showing the data or samples).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from PIL import Image
from tqdm import tqdm

DEFAULT_VERSION = "16.0.0"
STYLES = ("google", "twitter")  # apple/facebook images are not openly licensed
DROPPED_CATEGORY = "Component"
LICENCES = {
    "emoji-datasource": "MIT (c) Cal Henderson and contributors",
    "google": "Noto Emoji images by Google, Apache-2.0",
    "twitter": "Twemoji images (c) Twitter, Inc and other contributors, CC-BY 4.0",
}


class EmojiError(Exception):
    """A problem reported to the user as one line (exit code 2), without a traceback."""


def slug(category: str) -> str:
    """Filesystem-safe, sortable, readable folder name: "Smileys & Emotion" -> "smileys_and_emotion"."""
    return re.sub(r"[^a-z0-9]+", "_", category.lower().replace("&", " and ")).strip("_")


def split_of(unified: str) -> str:
    """'test' for ~10 % of emoji, decided by the base emoji's code alone (reproducible anywhere)."""
    return "test" if zlib.crc32(unified.encode()) % 100 < 10 else "train"


def _npm_error(stderr: str) -> str:
    # npm's literal last line is "A complete log ... can be found in ..."; show its first real message
    lines = [re.sub(r"^npm (error|ERR!)\s*", "", s.strip()) for s in stderr.splitlines()
             if s.startswith(("npm error", "npm ERR!")) and "complete log of this run" not in s]
    code = next((s.split()[1] for s in lines if s.startswith("code ")), "")
    msg = next((s for s in lines if s and s.split()[0] not in ("code", "errno", "syscall")), "")
    last = next((s.strip() for s in reversed(stderr.splitlines()) if s.strip()), "no output")
    return f"{code}: {msg}" if code and msg else (msg or code or last)


def fetch_package(style: str, version: str, cache_dir: Path) -> Path:
    """npm pack emoji-datasource-<style>@<version> into cache_dir (reused if present) and unpack
    emoji.json + the 64 px images (not the large sprite sheets). Returns the unpacked package/ dir."""
    name = f"emoji-datasource-{style}"
    dest = cache_dir / f"{name}-{version}"
    if (dest / "package" / "emoji.json").is_file():
        return dest / "package"
    tgz = cache_dir / f"{name}-{version}.tgz"
    if not tgz.is_file():
        if shutil.which("npm") is None:
            raise EmojiError("npm not found on PATH: install Node.js/npm (https://nodejs.org) "
                             "to fetch the emoji packages")
        try:
            r = subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=cache_dir,
                               capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise EmojiError(f"npm pack {name}@{version} timed out after 15 min") from None
        if r.returncode != 0:
            raise EmojiError(f"npm pack {name}@{version} failed: {_npm_error(r.stderr)}")
        packed = cache_dir / (r.stdout.strip().splitlines() or [""])[-1]
        if not packed.is_file():
            raise EmojiError(f"npm pack {name}@{version} did not produce a tarball (stdout: {r.stdout.strip()!r})")
        packed.replace(tgz)
    wanted = ("package/emoji.json", f"package/img/{style}/64/")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
            tar.extractall(tmp, members=members, filter="data")  # "data" refuses paths escaping tmp
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # TarError includes FilterError
        raise EmojiError(f"cannot unpack {tgz} ({e}); delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "package"


def load_entries(package_dir: Path, style: str, skin_tones: bool = False) -> list[tuple[str, str, str]]:
    """(base unified, category, image file) for every image of `style` to include, Component dropped."""
    root = package_dir / "package" if (package_dir / "package").is_dir() else package_dir
    try:
        data = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmojiError(f"{root} has no emoji.json: not an emoji-datasource package") from None
    except ValueError as e:
        raise EmojiError(f"{root / 'emoji.json'} is not valid JSON ({e})") from None
    out = []
    for e in data:
        if e["category"] == DROPPED_CATEGORY:
            continue
        variants = [e] + (list((e.get("skin_variations") or {}).values()) if skin_tones else [])
        out += [(e["unified"], e["category"], v["image"]) for v in variants if v.get(f"has_img_{style}")]
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise EmojiError(f"{out} already exists; pass --overwrite to replace it")


def build_from_packages(package_dirs: dict[str, Path], out: Path, skin_tones: bool = False, *,
                        overwrite: bool = False, version: str | None = None) -> dict:
    """Lay out unpacked packages ({style: dir with package/ or emoji.json}) as the ImageFolder tree
    at `out`, atomically (build in <out>.tmp-<pid>, then rename). Returns the manifest."""
    out = Path(out)
    _check_out(out, overwrite)
    jobs, categories, emojis = [], {}, {"train": set(), "test": set()}
    for style, pkg in package_dirs.items():
        root = Path(pkg) / "package" if (Path(pkg) / "package").is_dir() else Path(pkg)
        img_dir = root / "img" / style / "64"
        entries = load_entries(root, style, skin_tones)
        missing = [img for _, _, img in entries if not (img_dir / img).is_file()]
        if missing:
            raise EmojiError(f"{img_dir}: {len(missing)} of {len(entries)} images missing (e.g. {missing[0]})")
        for unified, category, img in entries:
            split, folder = split_of(unified), slug(category)
            categories[folder] = category
            emojis[split].add(unified)
            jobs.append((img_dir / img, split, folder, f"{style}_{img}"))
    if not jobs:
        raise EmojiError("no images selected: check --styles and the packages")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {s: {f: 0 for f in sorted(categories)} for s in ("train", "test")}
    try:
        for src, split, folder, name in tqdm(jobs, desc="emoji", unit="img", mininterval=2):
            dst = tmp / split / folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:  # twemoji has some palette PNGs: go through RGBA
                rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            Image.alpha_composite(white, rgba).convert("RGB").save(dst)
            counts[split][folder] += 1
        manifest = {
            "version": version, "styles": list(package_dirs), "skin_tones": skin_tones,
            "dropped_category": DROPPED_CATEGORY,
            "split_rule": "test if zlib.crc32(base_unified.encode()) % 100 < 10 else train",
            "emojis": {s: len(v) for s, v in emojis.items()},
            "images": {s: sum(c.values()) for s, c in counts.items()},
            "counts": counts,
            "licences": {k: v for k, v in LICENCES.items() if k not in STYLES or k in package_dirs},
        }
        _write_json(tmp / "categories.json", dict(sorted(categories.items())))  # sorted = class index
        _write_json(tmp / "manifest.json", manifest)
        if out.exists():  # --overwrite: swap in the new tree, then drop the old one
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, c in counts.items():  # an empty class folder would shift ImageFolder's class indices
        if empty := [f for f, n in c.items() if n == 0]:
            print(f"warning: {split} has no images for {', '.join(empty)}", file=sys.stderr)
    return manifest


def build(out: Path, version: str = DEFAULT_VERSION, styles=STYLES, skin_tones: bool = False,
          cache_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Fetch the packages (into cache_dir, or a temporary dir) and build the tree at `out`."""
    _check_out(Path(out), overwrite)  # fail before downloading ~140 MB
    with tempfile.TemporaryDirectory(prefix="emoji-npm-") as tmp:
        cache = Path(cache_dir) if cache_dir else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        dirs = {s: fetch_package(s, version, cache) for s in styles}
        return build_from_packages(dirs, Path(out), skin_tones, overwrite=overwrite, version=version)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.emoji", description=__doc__.split("\n")[0],
                                epilog="Images: Noto Emoji (Apache-2.0), Twemoji (CC-BY 4.0, Twitter, Inc "
                                       "and other contributors); emoji-datasource (MIT).")
    p.add_argument("--out", required=True, type=Path, help="output root (gets train/ and test/)")
    p.add_argument("--version", default=DEFAULT_VERSION, help="emoji-datasource-* npm version (default %(default)s)")
    p.add_argument("--styles", default=",".join(STYLES), help="comma-separated, from: google,twitter")
    p.add_argument("--skin_tones", action=argparse.BooleanOptionalAction, default=False,
                   help="include skin-tone variations (default off: colour-only near-duplicates that "
                        "would make People & Body ~8x larger than any other class)")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help="keep the npm tarballs here and reuse them (default: temporary dir)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    args.styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if not args.styles or set(args.styles) - set(STYLES) or len(set(args.styles)) < len(args.styles):
        p.error(f"--styles must be distinct names from {','.join(STYLES)}, got {','.join(args.styles)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        m = build(args.out, args.version, args.styles, args.skin_tones, args.cache_dir, args.overwrite)
    except (EmojiError, OSError) as e:  # OSError: disk full, permissions, unreadable PNG
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n} images ({m['emojis'][s]} emoji)" for s, n in m["images"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
