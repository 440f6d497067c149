"""Where the emoji images come from: the sources of each style (npm package, versions, licences), packages
fetched with `npm pack`, emoji-datasource's emoji.json (the master list: code, name, category), SVG
rendering, and matching each style's pictures to emoji (style_images).

OpenMoji files are named by code (color/svg/1F600.svg). Fluent files are named by a slug of the emoji's
CLDR name (icons/flat/grinning-face.svg, skin-toned ones as <name>-default.svg / -light.svg / ...), so
they are matched by name: first a few known renames (FLUENT_ALIASES), then the CLDR name that OpenMoji's
data/openmoji.json gives for the code, then emoji-datasource's own names; each file goes to one emoji.
EmojiOne, Noto v1 and EmojiOne 1 come as Iconify JSON icon sets (one icons.json of SVG bodies) whose icons
are named the same way ("grinning-face", "flag-for-cuba"), so they are matched by the same passes, without
Fluent's renames; Firefox OS runs its names together ("alarmclock").
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
import zlib
from pathlib import Path

from PIL import Image

DROPPED_CATEGORY = "Component"  # bare skin-tone swatches and hair components, not emoji
TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}

# emoji-datasource code -> Fluent file name (without .svg), for files whose name is not the CLDR name.
# Checked by eye against the rendered files; each is tried before any name, so the old Unicode name
# "WOMAN WITH BUNNY EARS" of 1F46F cannot take the file of 1F46F-200D-2640-FE0F.
FLUENT_ALIASES = {
    "0023-FE0F-20E3": "keycap-hashtag", "002A-FE0F-20E3": "keycap-asterisk",
    "1F426-200D-1F525": "phoenix-bird", "1F426-200D-2B1B": "blackbird", "1F53A": "red-triangle",
    "1F635": "knocked-out-face", "1F959": ("stuffedbread-flat", "stuffedbread"), "1F93C": "person-wrestling",
    "1F46F": "person-with-bunny-ears", "1F46F-200D-2640-FE0F": "woman-with-bunny-ears",
    "1F46F-200D-2642-FE0F": "man-with-bunny-ears",
    "1F471": "person-blonde-hair", "1F471-200D-2640-FE0F": "woman-blonde-hair",
    "1F471-200D-2642-FE0F": "man-blonde-hair",
    "1F9CF": "person-deaf", "1F9CF-200D-2640-FE0F": "woman-deaf", "1F9CF-200D-2642-FE0F": "man-deaf",
    "1F9DC": "person-merpeople", "1F9DC-200D-2640-FE0F": "woman-merpeople",
    "1F9DC-200D-2642-FE0F": "man-merpeople",
    "1F9B8": "person-superhero", "1F9B9": "person-supervillain", "1F9D9": "person-mage",
    "1F9DA": "person-fairy", "1F9DB": "person-vampire", "1F9DD": "person-elf", "1F9DE": "person-genie",
    "1F9DF": "person-zombie",
}


DEFAULT_VERSION = "16.0.0"  # emoji-datasource-*
VERSIONS = {"openmoji": "17.0.0", "fluentui-emoji": "1.3.0", "@iconify-json/emojione": "1.2.3",
            "@iconify-json/fxemoji": "1.2.2", "@iconify-json/noto-v1": "1.2.5", "@iconify-json/emojione-v1": "1.2.3"}
STYLES = ("google", "twitter")  # categories layout; apple/facebook images are not openly licensed
# styles layout: style -> (npm package, image dir or icon set inside it)
SOURCES = {
    "noto": ("emoji-datasource-google", "img/google/64"),
    "twemoji": ("emoji-datasource-twitter", "img/twitter/64"),
    "openmoji": ("openmoji", "color/svg"),
    "fluent_flat": ("fluentui-emoji", "icons/flat"),
    "fluent_modern": ("fluentui-emoji", "icons/modern"),
    "emojione": ("@iconify-json/emojione", "icons.json"),
    "fxemoji": ("@iconify-json/fxemoji", "icons.json"),
    "noto_v1": ("@iconify-json/noto-v1", "icons.json"),
    "emojione_v1": ("@iconify-json/emojione-v1", "icons.json"),
}
WANTED = {  # what to unpack from each tarball
    "emoji-datasource-google": ("package/emoji.json", "package/img/google/64/"),
    "emoji-datasource-twitter": ("package/emoji.json", "package/img/twitter/64/"),
    "openmoji": ("package/data/openmoji.json", "package/color/svg/"),
    "fluentui-emoji": ("package/icons/flat/", "package/icons/modern/"),
    # every Iconify set: its icons and its info (name, licence)
    **{pkg: ("package/icons.json", "package/info.json") for pkg, where in SOURCES.values() if where == "icons.json"},
}
LICENCES = {
    "emoji-datasource": "MIT (c) Cal Henderson and contributors",
    "google": "Noto Emoji images by Google, Apache-2.0",
    "twitter": "Twemoji images (c) Twitter, Inc and other contributors, CC-BY 4.0",
    "openmoji": "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0",
    "fluent": "Fluent Emoji (c) Microsoft Corporation, MIT (npm fluentui-emoji repackaging, MIT)",
    "emojione": "EmojiOne 2 artwork (c) Ranks.com, as kept by the EmojiTwo project, CC BY 4.0 "
                "(npm @iconify-json/emojione, Iconify's repackaging)",
    "fxemoji": "Firefox OS Emoji (c) Mozilla Foundation, visual design CC BY 4.0, code Apache-2.0 "
               "(npm @iconify-json/fxemoji, Iconify's repackaging)",
    "noto_v1": "Noto Emoji v1 (the first, blob design) by Google, Apache-2.0 (npm @iconify-json/noto-v1, Iconify's "
               "repackaging)",
    "emojione_v1": "EmojiOne 1 artwork (c) Ranks.com, CC BY-SA 4.0 (npm @iconify-json/emojione-v1, Iconify's "
                   "repackaging)",
}
STYLE_LICENCE = {"noto": "google", "twemoji": "twitter", "openmoji": "openmoji",
                 "fluent_flat": "fluent", "fluent_modern": "fluent", "emojione": "emojione",
                 "fxemoji": "fxemoji", "noto_v1": "noto_v1", "emojione_v1": "emojione_v1"}


class EmojiError(Exception):
    """A problem reported to the user as one line (exit code 2), without a traceback."""


def _npm_error(stderr: str) -> str:
    # npm's literal last line is "A complete log ... can be found in ..."; show its first real message
    lines = [re.sub(r"^npm (error|ERR!)\s*", "", s.strip()) for s in stderr.splitlines()
             if s.startswith(("npm error", "npm ERR!")) and "complete log of this run" not in s]
    code = next((s.split()[1] for s in lines if s.startswith("code ")), "")
    msg = next((s for s in lines if s and s.split()[0] not in ("code", "errno", "syscall")), "")
    last = next((s.strip() for s in reversed(stderr.splitlines()) if s.strip()), "no output")
    return f"{code}: {msg}" if code and msg else (msg or code or last)


def fetch_package(name: str, version: str, cache_dir: Path, wanted: tuple[str, ...]) -> Path:
    """npm pack <name>@<version> into cache_dir (tarball and unpacked dir reused if present) and unpack
    only the members under `wanted` (paths inside the tarball, e.g. "package/emoji.json"), not the
    large sprite sheets or fonts. Returns the unpacked package/ dir."""
    stem = f"{name.removeprefix('@').replace('/', '-')}-{version}"  # "@iconify-json/x" is a scoped package
    dest = cache_dir / stem
    if all((dest / w).exists() for w in wanted):  # renamed into place only once complete
        return dest / "package"
    tgz = cache_dir / f"{stem}.tgz"
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=cache_dir))
    try:
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)]
            tar.extractall(tmp, members=members, filter="data")  # "data" refuses paths escaping tmp
        (tmp / "package").mkdir(exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # TarError includes FilterError
        raise EmojiError(f"cannot unpack {tgz} ({e}); delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "package"


def package_root(path: Path) -> Path:
    """Accept either an unpacked tarball (with package/) or the package dir itself."""
    path = Path(path)
    return path / "package" if (path / "package").is_dir() else path


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmojiError(f"{path.parent} has no {path.name}: not {what}") from None
    except ValueError as e:
        raise EmojiError(f"{path} is not valid JSON ({e})") from None


def read_emoji_json(package_dir: Path) -> list[dict]:
    """emoji-datasource's emoji.json, the "Component" category dropped."""
    data = _read_json(package_root(package_dir) / "emoji.json", "an emoji-datasource package")
    if not isinstance(data, list) or not all(isinstance(e, dict) and {"unified", "name", "category", "image"}
                                             <= e.keys() for e in data):
        raise EmojiError(f"{package_root(package_dir) / 'emoji.json'}: expected a list of emoji objects with "
                         "unified, name, category and image")
    return [e for e in data if e["category"] != DROPPED_CATEGORY]


def variants(e: dict, skin_tones: bool) -> list[tuple[dict, str]]:
    """(entry, skin-tone key or "") for the base emoji and, with skin_tones, its skin variations."""
    skins = (e.get("skin_variations") or {}).items() if skin_tones else ()
    return [(e, "")] + [(v, k) for k, v in skins]


def variant_text(name: str, tone_key: str) -> str:
    """The caption: emoji-datasource's name, lower-cased; a skin variation gets CLDR's tone suffix."""
    text = name.lower()
    if tone_key:
        text += ": " + ", ".join(f"{TONES.get(t, t)} skin tone" for t in tone_key.split("-"))
    return text


def no_fe0f(code: str) -> str:
    # emoji-datasource writes fully-qualified codes (263A-FE0F); OpenMoji's files do not always
    return code.upper().replace("-FE0F", "")


def openmoji_index(package_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """({code without FE0F: color SVG}, {code without FE0F: CLDR name}) from an unpacked openmoji package."""
    root = package_root(package_dir)
    svg_dir = root / "color" / "svg"
    if not svg_dir.is_dir():
        raise EmojiError(f"{root} has no color/svg/: not an openmoji package")
    data = _read_json(root / "data" / "openmoji.json", "an openmoji package")
    names = {no_fe0f(o["hexcode"]): o["annotation"] for o in data
             if isinstance(o, dict) and isinstance(o.get("hexcode"), str) and o.get("annotation")}
    return {no_fe0f(p.stem): p for p in sorted(svg_dir.glob("*.svg"))}, names


def openmoji_keywords(package_dir: Path) -> dict[str, list[str]]:
    """{code without FE0F: its CLDR keywords} from OpenMoji's data ("tags": "cat, face, pet" for cat face),
    lower-cased, in order, each once."""
    data = _read_json(package_root(package_dir) / "data" / "openmoji.json", "an openmoji package")
    out = {}
    for o in data:
        if isinstance(o, dict) and isinstance(o.get("hexcode"), str) and isinstance(o.get("tags"), str):
            words = [w.strip().lower() for w in o["tags"].split(",")]
            if words := list(dict.fromkeys(w for w in words if w)):
                out[no_fe0f(o["hexcode"])] = words
    return out


def squashed_slug(name: str) -> str:
    """A name as Firefox OS emoji name their icons, run together: "Alarm clock" -> "alarmclock"."""
    return fluent_slug(name).replace("-", "")


def fluent_slug(name: str) -> str:
    """A CLDR name as Fluent names its files: "A button (blood type)" -> "a-button-blood-type"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # piñata -> pinata
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")


# the Iconify sets of SOURCES: how each names its icons
ICONIFY_SLUGS = {"emojione": fluent_slug, "fxemoji": squashed_slug, "noto_v1": fluent_slug, "emojione_v1": fluent_slug}
SVG_STYLES = {"openmoji", "fluent_flat", "fluent_modern", *ICONIFY_SLUGS}


def match_files(emojis: list[dict], files: set[str], cldr: dict[str, str], aliases: dict | None = None,
                canonical: dict[str, str] | None = None, slug=None) -> tuple[dict[str, str], list[str]]:
    """Match image names (Fluent's files without .svg, an Iconify set's icons) to emoji-datasource entries by
    slug. Returns ({unified: base name, e.g. "waving-hand-default" when the file has skin tones}, unused
    pictures). Passes in order of trust (`aliases` {unified: name(s)}, CLDR name, emoji-datasource names).
    `canonical` maps a name to the picture it draws (an Iconify alias to its icon): each picture is taken
    at most once, so two emoji never share one. `slug`: how a name becomes a file name (fluent_slug)."""
    slug = slug or fluent_slug
    canon = (canonical or {}).get
    # "<name>-light" is a skin tone only beside "<name>-default": "police-car-light" is an emoji
    toned = {f for f in files for t in TONES.values() if f.endswith(f"-{t}") and f"{f[:-len(t)]}default" in files}
    base_files = files - toned
    matched: dict[str, str] = {}
    taken: set[str] = set()

    def take(unified: str, names) -> None:
        for n in names:
            for f in (n, f"{n}-default"):
                if unified not in matched and f in base_files and canon(f, f) not in taken:
                    matched[unified] = f
                    taken.add(canon(f, f))

    for e in emojis:
        alias = (aliases or {}).get(e["unified"], ())
        take(e["unified"], (alias,) if isinstance(alias, str) else alias)
    for e in emojis:
        take(e["unified"], [slug(cldr.get(no_fe0f(e["unified"]), ""))])
    for e in emojis:
        take(e["unified"], [slug(n) for n in [e["name"] or "", *(e.get("short_names") or [])]])
    return matched, sorted({canon(f, f) for f in base_files} - taken)


def iconify_icons(package_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """An Iconify JSON icon set (icons.json: SVG bodies without their <svg> element, plus aliases) as
    ({icon: standalone SVG markup}, {name: icon it draws}). The names are the icons, their plain aliases
    ("bear" -> "bear-face") and, for flags, CLDR's "flag-cuba" beside the set's "flag-for-cuba"."""
    root = package_root(package_dir)
    data = _read_json(root / "icons.json", "an Iconify JSON package")
    if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
        raise EmojiError(f"{root / 'icons.json'}: expected an Iconify icon set (an object with \"icons\")")

    def svg(icon: dict) -> str:  # the icon's box, else the set's (Iconify's defaults: 0 0 16 16)
        box = [icon.get(k, data.get(k, d)) for k, d in (("left", 0), ("top", 0), ("width", 16), ("height", 16))]
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{" ".join(map(str, box))}">'
                f'{icon["body"]}</svg>')

    icons = {n: svg(i) for n, i in data["icons"].items() if isinstance(i, dict) and isinstance(i.get("body"), str)}
    names = {n: n for n in icons}
    for name, a in (data.get("aliases") or {}).items():
        # plain renames only: an alias that flips or rotates its parent draws another picture
        if isinstance(a, dict) and set(a) == {"parent"} and a["parent"] in icons:
            names.setdefault(name, a["parent"])
    for n in list(names):  # CLDR drops "for" and the "&" of "flag: Antigua & Barbuda"
        if n.startswith("flag-for-"):
            for short in ("flag-" + n[len("flag-for-"):], "flag-" + n[len("flag-for-"):].replace("-and-", "-")):
                names.setdefault(short, names[n])
    return icons, names


def iconify_variant(base: str, tone_key: str, names: dict[str, str]) -> str | None:
    """The icon of a skin variation in an Iconify emoji set: "<name>-<tone>-skin-tone" (single tones only)."""
    if not tone_key:
        return names[base]
    return names.get(f"{base}-{TONES[tone_key]}-skin-tone") if tone_key in TONES else None


def fluent_variant(base_file: str, tone_key: str, files: set[str]) -> str | None:
    """The Fluent file of a skin variation: "<name>-default" -> "<name>-light" etc. (single tones only)."""
    if not tone_key:
        return base_file
    if not base_file.endswith("-default") or tone_key not in TONES:
        return None
    f = base_file[: -len("default")] + TONES[tone_key]
    return f if f in files else None


def on_white(rgba: Image.Image) -> Image.Image:
    """Composite on white and drop alpha: the models see RGB."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_png(path: Path) -> Image.Image:
    with Image.open(path) as im:  # twemoji has some palette PNGs: go through RGBA
        return on_white(im.convert("RGBA"))


def check_renderer() -> None:
    """Fail before any download when the SVG renderer is not installed."""
    try:
        import resvg_py  # noqa: F401
    except ImportError:
        raise EmojiError("SVG renderer missing: pip install resvg-py (listed in requirements.txt)") from None


def render_svg(source: Path | str, size: int = 64) -> Image.Image:
    """Render an SVG file (a Path) or SVG markup (a str) antialiased into a size x size box (aspect kept,
    centred), composited on white."""
    import resvg_py
    where = {"svg_path": str(source)} if isinstance(source, Path) else {"svg_string": source}
    try:
        # no system fonts: the emoji SVGs draw no text, and the output must not depend on the machine
        data = resvg_py.svg_to_bytes(**where, width=size, height=size, skip_system_fonts=True,
                                     shape_rendering="geometric_precision")
    except ValueError as e:
        raise EmojiError(f"cannot render {source if isinstance(source, Path) else 'an icon'}: {e}") from None
    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # a few Fluent viewBoxes are 32x33
    canvas.paste(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2))
    return on_white(canvas)


def style_images(style: str, root: Path, emojis: list[dict], skin_tones: bool, cldr: dict[str, str]):
    """([(base entry, variant entry, tone key, source: an image file, or SVG markup)], [unmatched base entries],
    [unused files or icons])."""
    img_dir = root / SOURCES[style][1]
    if not img_dir.exists():
        where = SOURCES[style][1] + ("" if style in ICONIFY_SLUGS else "/")
        raise EmojiError(f"{root} has no {where}: not a {SOURCES[style][0]} package")
    found, unmatched, unused = [], [], []
    if style in ("noto", "twemoji"):
        flag = f"has_img_{STYLE_LICENCE[style]}"  # has_img_google / has_img_twitter
        for e in emojis:
            hits = [(e, v, t, img_dir / v["image"]) for v, t in variants(e, skin_tones) if v.get(flag)]
            found += hits
            unmatched += [] if e.get(flag) else [e]
        missing = [str(p.name) for *_, p in found if not p.is_file()]
        if missing:
            raise EmojiError(f"{img_dir}: {len(missing)} of {len(found)} images missing (e.g. {missing[0]})")
    elif style == "openmoji":
        svgs, _ = openmoji_index(root)
        for e in emojis:
            found += [(e, v, t, svgs[no_fe0f(v["unified"])]) for v, t in variants(e, skin_tones)
                      if no_fe0f(v["unified"]) in svgs]
            unmatched += [] if no_fe0f(e["unified"]) in svgs else [e]
    else:  # matched by name: an Iconify set's icons (SVG markup, not files) or Fluent's files
        if style in ICONIFY_SLUGS:
            icons, names = iconify_icons(root)
            matched, unused = match_files(emojis, set(names), cldr, canonical=names, slug=ICONIFY_SLUGS[style])
            unused = [u for u in unused if not u.endswith("-skin-tone")]  # variations, not pictures left over

            def source(base: str, tone: str):
                icon = iconify_variant(base, tone, names)
                return icons[icon] if icon else None
        else:
            files = {p.stem for p in img_dir.glob("*.svg")}
            matched, unused = match_files(emojis, files, cldr, FLUENT_ALIASES)
            unused = [f"{f}.svg" for f in unused]

            def source(base: str, tone: str):
                f = fluent_variant(base, tone, files)
                return img_dir / f"{f}.svg" if f else None
        for e in emojis:
            if e["unified"] not in matched:
                unmatched.append(e)
                continue
            found += [(e, v, t, src) for v, t in variants(e, skin_tones) if (src := source(matched[e["unified"]], t))]
    return found, unmatched, unused
