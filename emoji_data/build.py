"""Build the emoji data: 64 px emoji in nine styles, captioned with their names (default), or a
tree by category.

    python -m emoji_data.build --out data/emoji
        [--styles noto,twemoji,openmoji,fluent_flat,fluent_modern,emojione,fxemoji,noto_v1,emojione_v1]
    python -m emoji_data.build --out data/emoji --layout categories [--styles google,twitter]
        [--version 16.0.0] [--openmoji_version 17.0.0] [--fluent_version 1.3.0] [--emojione_version 1.2.3]
        [--fxemoji_version 1.2.2] [--noto_v1_version 1.2.5] [--emojione_v1_version 1.2.3]
        [--skin_tones | --no-skin_tones] [--keywords [--max_keywords K] [--name_repeats N]]
        [--cache_dir DIR] [--overwrite]

Fetches npm packages with `npm pack` (needs Node.js/npm): emoji-datasource-google / -twitter (64 px PNGs and
emoji.json, the list of emoji with names and categories), openmoji (colour SVGs), fluentui-emoji
(icons/flat and icons/modern SVGs) and four Iconify icon sets, each one icons.json of SVGs: @iconify-json/emojione,
-fxemoji, -noto-v1 and -emojione-v1 (EmojiOne 2, Firefox OS, Noto's first blob design, EmojiOne 1). SVGs are
rendered antialiased at 64 px; everything is composited on white and written as RGB PNG. The four Iconify
sets each draw part of the same emoji once more. The "Component" category (bare skin-tone swatches) is dropped.

Styles layout (default), a captioned folder per split whose class sub-folders are the styles:

    <out>/{train,test}/<style>/<image>.png, <out>/{train,test}/metadata.jsonl, manifest.json, unmatched.json

metadata rows: file_name ("noto/1f600.png"), text (the emoji's CLDR name, lower-cased, as OpenMoji lists it:
"enraged face"; emoji-datasource's name where OpenMoji has none), unified, category, unicode_name
(emoji-datasource's name, sometimes an old Unicode one: "pouting face"), keywords (OpenMoji's CLDR keywords,
when it lists them) and, in test/, heldout. With --keywords, train/ also has one caption row per keyword of
each image ({"file_name", "text": "pet", "unified", "category", "keyword": true}): words that recur across
emoji; test/ keeps one row per image.

Split, so anyone can rebuild it: an emoji is held out in every style ("emoji") when
zlib.crc32(unified.encode()) % 100 < 10 (the base emoji's code, e.g. "1F600"); else the (emoji, style) pair
is held out ("pair") when zlib.crc32(f"{unified}/{style}".encode()) % 100 < 10, the emoji staying in train
in its other styles.

Categories layout: <out>/{train,test}/<category>/<style>_<image>.png plus categories.json
and manifest.json, an emoji held out (all its styles) by the first rule alone.

Skin-tone variations are OFF by default: they differ from the base emoji only in skin colour and would
make people ~8x more frequent than anything else; --skin_tones includes them (same split as the base).

Licences: emoji-datasource MIT; Noto Emoji Apache-2.0 (Google); Twemoji CC-BY 4.0 (Twitter, Inc and
other contributors); OpenMoji CC BY-SA 4.0; Fluent Emoji MIT (Microsoft); EmojiOne 2 (Ranks.com, kept by
EmojiTwo) CC BY 4.0; Firefox OS Emoji (Mozilla) CC BY 4.0; Noto Emoji v1 (Google) Apache-2.0; EmojiOne 1
CC BY-SA 4.0. Credit them with the data.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from rqcore.checks import is_whole
from emoji_data.sources import (DEFAULT_VERSION, DROPPED_CATEGORY, ICONIFY_SLUGS, LICENCES, SOURCES, STYLE_LICENCE,
                                STYLES, SVG_STYLES, VERSIONS, WANTED, EmojiError, check_renderer, fetch_package,
                                load_png, no_fe0f, openmoji_index, openmoji_keywords, package_root, read_emoji_json,
                                render_svg, style_images, variant_text, variants)

__all__ = ["EmojiError", "build_from_packages", "build_styles_from_packages", "main"]


def slug(category: str) -> str:
    """Filesystem-safe, sortable, readable folder name: "Smileys & Emotion" -> "smileys_and_emotion"."""
    return re.sub(r"[^a-z0-9]+", "_", category.lower().replace("&", " and ")).strip("_")


def split_of(unified: str) -> str:
    """'test' for ~10 % of emoji, decided by the base emoji's code alone (reproducible anywhere)."""
    return "test" if zlib.crc32(unified.encode()) % 100 < 10 else "train"


def heldout_of(unified: str, style: str) -> str | None:
    """"emoji" (held out in every style), "pair" (held out in this style only) or None (train)."""
    if split_of(unified) == "test":
        return "emoji"
    return "pair" if zlib.crc32(f"{unified}/{style}".encode()) % 100 < 10 else None


def load_entries(package_dir: Path, style: str, skin_tones: bool = False) -> list[tuple[str, str, str]]:
    """(base unified, category, image file) for every image of `style` to include, Component dropped."""
    return [(e["unified"], e["category"], v["image"]) for e in read_emoji_json(package_dir)
            for v, _ in variants(e, skin_tones) if v.get(f"has_img_{style}")]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise EmojiError(f"{out} already exists; pass --overwrite to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished tree at tmp to out (--overwrite: swap in the new tree, then drop the old one)."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def _tmp_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def build_from_packages(package_dirs: dict[str, Path], out: Path, skin_tones: bool = False, *,
                        overwrite: bool = False, version: str | None = None) -> dict:
    """Categories layout: lay out unpacked emoji-datasource packages ({style: dir}) as the ImageFolder
    tree at `out`, atomically (built in <out>.tmp-<pid>, then renamed). Returns the manifest."""
    out = Path(out)
    _check_out(out, overwrite)
    jobs, categories, emojis = [], {}, {"train": set(), "test": set()}
    for style, pkg in package_dirs.items():
        img_dir = package_root(pkg) / "img" / style / "64"
        entries = load_entries(pkg, style, skin_tones)
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

    tmp = _tmp_for(out)
    counts = {s: {f: 0 for f in sorted(categories)} for s in ("train", "test")}
    try:
        for src, split, folder, name in tqdm(jobs, desc="emoji", unit="img", mininterval=2):
            dst = tmp / split / folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            load_png(src).save(dst)
            counts[split][folder] += 1
        manifest = {
            "version": version, "styles": list(package_dirs), "skin_tones": skin_tones,
            "dropped_category": DROPPED_CATEGORY,
            "split_rule": "test if zlib.crc32(base_unified.encode()) % 100 < 10 else train",
            "emojis": {s: len(v) for s, v in emojis.items()},
            "images": {s: sum(c.values()) for s, c in counts.items()},
            "counts": counts,
            "licences": {k: v for k, v in LICENCES.items() if k == "emoji-datasource" or k in package_dirs},
        }
        _write_json(tmp / "categories.json", dict(sorted(categories.items())))  # sorted = class index
        _write_json(tmp / "manifest.json", manifest)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, c in counts.items():  # an empty class folder would shift ImageFolder's class indices
        if empty := [f for f, n in c.items() if n == 0]:
            print(f"warning: {split} has no images for {', '.join(empty)}", file=sys.stderr)
    return manifest


def check_caption_options(keywords: bool, max_keywords: int | None, name_repeats: int, layout: str = "styles"):
    """Refuse keyword options that would silently change nothing or drop rows (CLI and library alike)."""
    if keywords and layout != "styles":
        raise EmojiError("--keywords needs the styles layout (captioned folders)")
    if max_keywords is not None and (not keywords or not is_whole(max_keywords) or max_keywords < 1):
        raise EmojiError("--max_keywords needs --keywords and a whole number >= 1")
    if name_repeats != 1 and (not keywords or not is_whole(name_repeats) or name_repeats < 1):
        raise EmojiError("--name_repeats needs --keywords and a whole number >= 1")


def build_styles_from_packages(packages: dict[str, Path], out: Path, styles=tuple(SOURCES),
                               skin_tones: bool = False, *, overwrite: bool = False,
                               versions: dict | None = None, keywords: bool = False,
                               max_keywords: int | None = None, name_repeats: int = 1) -> dict:
    """Styles layout from unpacked packages ({npm name: dir}): emoji.json from emoji-datasource-google
    (or -twitter), OpenMoji's CLDR names (when given) for matching Fluent files. Writes the captioned
    folders at `out` atomically and returns the manifest (with per-style match counts).
    keywords (needs openmoji): each training image also gets one caption row per CLDR keyword of its emoji
    ("cat", "face", "pet" for cat face; marked "keyword": true), so that words recur across emoji.
    max_keywords: at most this many per image, those most emoji share first (names stay a larger share).
    name_repeats: write each training image's name row this many times, so that names keep their weight
    beside the keyword rows (each row is one draw of an epoch)."""
    check_caption_options(keywords, max_keywords, name_repeats)
    out = Path(out)
    _check_out(out, overwrite)
    ds = next((packages[n] for n in ("emoji-datasource-google", "emoji-datasource-twitter") if n in packages), None)
    if ds is None:
        raise EmojiError("no emoji-datasource package given: emoji.json lists the emoji and their names")
    emojis = read_emoji_json(ds)
    cldr = openmoji_index(packages["openmoji"])[1] if "openmoji" in packages else {}
    if keywords and "openmoji" not in packages:
        raise EmojiError("keyword captions need the openmoji package (its data lists the CLDR keywords)")
    words = openmoji_keywords(packages["openmoji"]) if keywords else {}
    if max_keywords is not None:  # keep the words most emoji share: they are what links names together
        shared = Counter(w for ws in words.values() for w in ws)
        words = {code: sorted(ws, key=lambda w: -shared[w])[:max_keywords] for code, ws in words.items()}
    jobs, match, unmatched_out = style_jobs(packages, styles, emojis, skin_tones, cldr, words)
    tmp = _tmp_for(out)
    try:
        rows, counts, heldout = write_style_images(tmp, jobs, styles, name_repeats)
        manifest = {
            "layout": "styles", "versions": versions, "styles": list(styles), "skin_tones": skin_tones,
            "dropped_category": DROPPED_CATEGORY,
            "split_rule": {"emoji": "test (heldout 'emoji') if zlib.crc32(unified.encode()) % 100 < 10",
                           "pair": "else test (heldout 'pair') if zlib.crc32(f'{unified}/{style}'.encode()) "
                                   "% 100 < 10, unified being the base emoji's code"},
            "emojis": len(emojis), "images": {s: sum(c.values()) for s, c in counts.items()},
            "keyword_captions": sum(bool(r.get("keyword")) for r in rows["train"]),
            "counts": counts, "heldout_images": {k: heldout[k] for k in ("emoji", "pair")}, "match": match,
            "licences": {k: LICENCES[k] for k in dict.fromkeys(
                ["emoji-datasource"] + [STYLE_LICENCE[s] for s in styles])},
        }
        _write_json(tmp / "manifest.json", manifest)
        _write_json(tmp / "unmatched.json", unmatched_out)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, c in counts.items():  # an empty style folder would shift the class indices
        if empty := [st for st, n in c.items() if n == 0]:
            print(f"warning: {split} has no images for {', '.join(empty)}", file=sys.stderr)
    return manifest


def style_jobs(packages: dict[str, Path], styles, emojis: list[dict], skin_tones: bool, cldr: dict,
               words: dict) -> tuple[list, dict, dict]:
    """(jobs: (source, split, metadata row) per image; match counts per style; what matched nothing)."""
    jobs, match, unmatched_out = [], {}, {}
    for style in styles:
        if SOURCES[style][0] not in packages:
            raise EmojiError(f"style {style} needs the {SOURCES[style][0]} package")
        found, unmatched, unused = style_images(style, package_root(packages[SOURCES[style][0]]), emojis,
                                                 skin_tones, cldr)
        match[style] = {"matched": len(emojis) - len(unmatched), "unmatched": len(unmatched),
                        "unmatched_by_category": dict(Counter(e["category"] for e in unmatched).most_common()),
                        "unused_files": len(unused)}
        unmatched_out[style] = {"emoji": [{"unified": e["unified"], "text": e["name"].lower(),
                                           "category": e["category"]} for e in unmatched],
                                "unused_files": unused}
        for e, v, tone, src in found:
            row = {"file_name": f"{style}/{v['image']}",
                   "text": variant_text(cldr.get(no_fe0f(e["unified"]), e["name"]), tone),
                   "unified": v["unified"], "category": e["category"], "unicode_name": variant_text(e["name"], tone)}
            if tone:
                row["base_unified"] = e["unified"]
            if held := heldout_of(e["unified"], style):
                row["heldout"] = held
            jobs.append((src, "test" if held else "train", row))
            if words.get(no_fe0f(e["unified"])):
                row["keywords"] = words[no_fe0f(e["unified"])]
    if not jobs:
        raise EmojiError("no images selected: check --styles and the packages")
    return jobs, match, unmatched_out


def write_style_images(tmp: Path, jobs: list, styles, name_repeats: int) -> tuple[dict, dict, Counter]:
    """Render every job into tmp/<split>/<style>/ and write each split's metadata.jsonl; returns (rows per
    split, image counts per split and style, images per heldout kind)."""
    counts = {s: {st: 0 for st in styles} for s in ("train", "test")}
    heldout = Counter()
    rows = {"train": [], "test": []}
    for src, split, row in tqdm(jobs, desc="emoji", unit="img", mininterval=2):
        dst = tmp / split / row["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        (render_svg(src) if isinstance(src, str) or src.suffix == ".svg" else load_png(src)).save(dst)
        rows[split].append(row)
        if split == "train":  # extra captions of the same file: training only, so the test pairs stay one each
            rows[split] += [row] * (name_repeats - 1)
            rows[split] += [{"file_name": row["file_name"], "text": w, "unified": row["unified"],
                             "category": row["category"], "keyword": True}
                            for w in row.get("keywords", []) if w != row["text"]]
        counts[split][row["file_name"].split("/")[0]] += 1
        heldout[row.get("heldout", "train")] += 1
    for split, rs in rows.items():
        (tmp / split).mkdir(parents=True, exist_ok=True)
        (tmp / split / "metadata.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
    return rows, counts, heldout


def build(out: Path, layout: str = "styles", styles=None, skin_tones: bool = False, cache_dir: Path | None = None,
          overwrite: bool = False, version: str = DEFAULT_VERSION, versions: dict | None = None,
          keywords: bool = False, max_keywords: int | None = None, name_repeats: int = 1) -> dict:
    """Fetch the packages (into cache_dir, or a temporary dir) and build `layout` at `out`."""
    check_caption_options(keywords, max_keywords, name_repeats, layout)  # fail before downloading ~160 MB
    _check_out(Path(out), overwrite)
    versions = {"emoji-datasource": version, **VERSIONS, **(versions or {})}
    styles = list(styles or (STYLES if layout == "categories" else SOURCES))
    if layout == "styles" and set(styles) & SVG_STYLES:
        check_renderer()
    with tempfile.TemporaryDirectory(prefix="emoji-npm-") as tmp:
        cache = Path(cache_dir) if cache_dir else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)

        def get(name):
            v = versions["emoji-datasource"] if name.startswith("emoji-datasource") else versions[name]
            return fetch_package(name, v, cache, WANTED[name])

        if layout == "categories":
            dirs = {s: get(f"emoji-datasource-{s}") for s in styles}
            return build_from_packages(dirs, Path(out), skin_tones, overwrite=overwrite, version=version)
        names = [SOURCES[s][0] for s in styles]
        if "emoji-datasource-google" not in names and "emoji-datasource-twitter" not in names:
            names.insert(0, "emoji-datasource-google")  # for emoji.json alone
        if "fluentui-emoji" in names or {SOURCES[s][0] for s in ICONIFY_SLUGS} & set(names) or keywords:
            names.append("openmoji")  # its CLDR names match Fluent's and EmojiOne's names; it lists the keywords
        pkgs = {n: get(n) for n in dict.fromkeys(names)}
        return build_styles_from_packages(pkgs, Path(out), styles, skin_tones, overwrite=overwrite,
                                          versions={n: versions["emoji-datasource"] if n.startswith("emoji-")
                                                    else versions[n] for n in pkgs}, keywords=keywords,
                                          max_keywords=max_keywords, name_repeats=name_repeats)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emoji_data.build", description=__doc__.split("\n")[0],
                                epilog="Images: Noto Emoji (Apache-2.0), Twemoji (CC-BY 4.0, Twitter, Inc and "
                                       "other contributors), OpenMoji (CC BY-SA 4.0), Fluent Emoji (MIT, "
                                       "Microsoft), EmojiOne 2 (CC BY 4.0, Ranks.com / EmojiTwo), Firefox OS "
                                       "Emoji (CC BY 4.0, Mozilla), Noto Emoji v1 (Apache-2.0), EmojiOne 1 "
                                       "(CC BY-SA 4.0); "
                                       "emoji-datasource (MIT).")
    p.add_argument("--out", required=True, type=Path, help="output root (gets train/ and test/)")
    p.add_argument("--layout", choices=("styles", "categories"), default="styles",
                   help="styles: captioned, one class per style (default); categories: one class per category")
    p.add_argument("--styles", default=None, help=f"comma-separated; styles layout: {','.join(SOURCES)} "
                   f"(default all); categories layout: {','.join(STYLES)} (default both)")
    p.add_argument("--version", default=DEFAULT_VERSION, help="emoji-datasource-* npm version (default %(default)s)")
    p.add_argument("--openmoji_version", default=VERSIONS["openmoji"],
                   help="openmoji npm version (default %(default)s)")
    p.add_argument("--fluent_version", default=VERSIONS["fluentui-emoji"],
                   help="fluentui-emoji npm version (default %(default)s)")
    for style in ICONIFY_SLUGS:  # --emojione_version, --fxemoji_version, ...
        pkg = SOURCES[style][0]
        p.add_argument(f"--{style}_version", default=VERSIONS[pkg], help=f"{pkg} npm version (default %(default)s)")
    p.add_argument("--skin_tones", action=argparse.BooleanOptionalAction, default=False,
                   help="include skin-tone variations (default off: colour-only near-duplicates that "
                        "would make people ~8x more frequent than anything else)")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help="keep the npm tarballs here and reuse them (default: temporary dir)")
    p.add_argument("--keywords", action="store_true",
                   help="styles layout: also caption each training image with its emoji's CLDR keywords, one row "
                        "each (\"cat\", \"face\", \"pet\" for cat face), so that words recur across emoji")
    p.add_argument("--max_keywords", type=int, default=None,
                   help="with --keywords: at most this many keyword rows per image, the words most emoji share "
                        "first (default: all, 5.5 per image on average)")
    p.add_argument("--name_repeats", type=int, default=1,
                   help="with --keywords: write each training image's name row this many times, so that names "
                        "keep their share of the draws beside the keyword rows (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    known = STYLES if args.layout == "categories" else tuple(SOURCES)
    args.styles = [s.strip() for s in (args.styles or ",".join(known)).split(",") if s.strip()]
    if not args.styles or set(args.styles) - set(known) or len(set(args.styles)) < len(args.styles):
        p.error(f"--styles must be distinct names from {','.join(known)} for --layout {args.layout}, "
                f"got {','.join(args.styles)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        m = build(args.out, args.layout, args.styles, args.skin_tones, args.cache_dir, args.overwrite, args.version,
                  {"openmoji": args.openmoji_version, "fluentui-emoji": args.fluent_version,
                   **{SOURCES[s][0]: getattr(args, f"{s}_version") for s in ICONIFY_SLUGS}}, args.keywords,
                  args.max_keywords, args.name_repeats)
    except (EmojiError, OSError) as e:  # OSError: disk full, permissions, unreadable PNG
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.layout == "categories":
        print(f"wrote {args.out}: " + ", ".join(f"{s} {n} images ({m['emojis'][s]} emoji)"
                                                for s, n in m["images"].items()))
        return 0
    for style, c in m["match"].items():
        why = ", ".join(f"{n} {cat}" for cat, n in c["unmatched_by_category"].items())
        unused = f"; {c['unused_files']} files matched no emoji" if c["unused_files"] else ""
        print(f"{style}: {c['matched']} of {m['emojis']} emoji matched, {c['unmatched']} not"
              f"{f' ({why})' if why else ''}{unused}; train {m['counts']['train'][style]}, "
              f"test {m['counts']['test'][style]} images")
    if m["keyword_captions"]:
        print(f"{m['keyword_captions']} keyword captions beside the names of the training images")
    print(f"wrote {args.out}: train {m['images']['train']}, test {m['images']['test']} images "
          f"(held out: {m['heldout_images']['emoji']} of unseen emoji, {m['heldout_images']['pair']} pairs); "
          f"unmatched listed in {args.out / 'unmatched.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
