"""emoji_data.build's default layout on tiny fake packages: nine styles, captioned, emoji- and pair-level
held-out split, with real tiny SVGs (files, and an Iconify icon set's markup) rendered by the real renderer."""
from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from emoji_data import build as emoji, sources as emoji_sources
from emoji_fakes import HELD, STYLES, entry, files, find_code, held_out, make_package, serve_tarballs
from training.data import captioned_image_folder


STYLES5 = ("noto", "twemoji", "openmoji", "fluent_flat", "fluent_modern", "emojione", "fxemoji", "noto_v1",
           "emojione_v1")
LIKE_EMOJIONE = ("emojione", "noto_v1", "emojione_v1")  # Iconify sets named by CLDR slug: the same fake


def expected_heldout(base: str, style: str):
    """The issue's rule, written out independently of the code under test."""
    if zlib.crc32(base.encode()) % 100 < 10:
        return "emoji"
    return "pair" if zlib.crc32(f"{base}/{style}".encode()) % 100 < 10 else None


# held out in noto only (its other styles stay in train), and in train in every style
PAIRED = find_code(lambda c: not held_out(c) and expected_heldout(c, "noto") == "pair"
                   and expected_heldout(c, "fluent_flat") is None)
TRAINED = find_code(lambda c: all(expected_heldout(c, s) is None for s in STYLES5))
BUNNY, BUNNY_W, FLAG = "1F46F", "1F46F-200D-2640-FE0F", "1F1FA-1F1F8"
V6_ENTRIES = [  # (entry, CLDR name as OpenMoji gives it)
    (entry(TRAINED, "Smileys & Emotion", name="GRINNING FACE"), "grinning face"),
    (entry(PAIRED, "Smileys & Emotion", name="POUTING FACE"), "enraged face"),  # Fluent: CLDR name
    (entry(HELD, "Animals & Nature", skins=["1F3FB"], name="CAT FACE"), "cat face"),
    (entry(BUNNY, "People & Body", name="WOMAN WITH BUNNY EARS"), "people with bunny ears"),  # alias
    (entry(BUNNY_W, "People & Body", name="WOMEN WITH BUNNY EARS"), "women with bunny ears"),  # alias
    (entry("263A-FE0F", "Smileys & Emotion", name="WHITE SMILING FACE"), "smiling face"),  # OpenMoji: 263A
    (entry("1F6A5", "Travel & Places", name="HORIZONTAL TRAFFIC LIGHT"), "horizontal traffic light"),
    (entry(FLAG, "Flags", twitter=False, name="United States Flag"), "flag: United States"),
    (entry("1F3FB", "Component"), "light skin tone"),
]
FLUENT = {  # expected match per Fluent style; files not listed here: cat-face-light, mystery-object
    "fluent_flat": {TRAINED: "grinning-face", PAIRED: "enraged-face", HELD: "cat-face-default",
                    BUNNY: "person-with-bunny-ears", BUNNY_W: "woman-with-bunny-ears",
                    "263A-FE0F": "smiling-face", "1F6A5": "horizontal-traffic-light"}}
FLUENT["fluent_modern"] = {k: v for k, v in FLUENT["fluent_flat"].items() if k != PAIRED}
# EmojiOne, an Iconify set: matched by CLDR slug; "flag-for-" names answer CLDR's "flag-"; the alias
# "smiling-face" draws grinning-face, already taken (two emoji never share a picture); a flipped alias is
# another picture, so horizontal traffic light stays unmatched; "mystery-icon" matches nothing
EMOJIONE = {TRAINED: "grinning-face", HELD: "cat-face", FLAG: "flag-for-united-states"}
GREEN = '<rect x="1" width="4" height="4" fill="#0f0"/>'
ICONIFY = {"prefix": "emojione", "width": 4, "height": 4,
           "icons": {"grinning-face": {"body": GREEN}, "cat-face": {"body": GREEN},
                     "cat-face-light-skin-tone": {"body": GREEN}, "flag-for-united-states": {"body": GREEN},
                     "traffic-light": {"body": GREEN}, "mystery-icon": {"body": GREEN}},
           "aliases": {"smiling-face": {"parent": "grinning-face"},
                       "horizontal-traffic-light": {"parent": "traffic-light", "rotate": 1}}}
# Firefox OS runs names together, and draws no skin tones
FXEMOJI = {TRAINED: "grinningface", HELD: "catface", "1F6A5": "horizontaltrafficlight"}
FX_ICONS = {"prefix": "fxemoji", "width": 4, "height": 4,
            "icons": {**{n: {"body": GREEN} for n in FXEMOJI.values()}, "mysteryicon": {"body": GREEN}}}
# 4x4 red on the right 3/4 (transparent left quarter); and a 2:1 one, to be centred in the square
SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {}"><rect x="{}" width="4" height="4" fill="{}"/></svg>'
SQUARE, WIDE = SVG.format("4 4", 1, "#f00"), SVG.format("4 2", 0, "#00f")


def make_style_packages(root: Path) -> dict[str, Path]:
    entries = [e for e, _ in V6_ENTRIES]
    pkgs = {f"emoji-datasource-{s}": make_package(root / s, s, entries) for s in STYLES}
    om = root / "openmoji" / "package"
    (om / "color" / "svg").mkdir(parents=True)
    (om / "data").mkdir()
    codes = [(e["unified"].replace("-FE0F", "") if e["unified"] == "263A-FE0F" else e["unified"], cldr)
             for e, cldr in V6_ENTRIES] + [(f"{HELD}-1F3FB", "cat face: light skin tone")]
    (om / "data" / "openmoji.json").write_text(json.dumps([{"hexcode": h, "annotation": a} for h, a in codes]))
    for h, _ in codes:
        (om / "color" / "svg" / f"{h}.svg").write_text(SQUARE)
    for style, names in FLUENT.items():
        d = root / "fluentui-emoji" / "package" / "icons" / style.split("_")[1]
        d.mkdir(parents=True)
        for n in [*names.values(), "mystery-object"] + (["cat-face-light"] if style == "fluent_flat" else []):
            (d / f"{n}.svg").write_text(WIDE if n == "smiling-face" else SQUARE)
    iconify = {}
    for style in (*LIKE_EMOJIONE, "fxemoji"):
        name = emoji.SOURCES[style][0]  # "@iconify-json/emojione"
        d = root / name.split("/")[1] / "package"
        d.mkdir(parents=True)
        (d / "icons.json").write_text(json.dumps(FX_ICONS if style == "fxemoji" else ICONIFY))
        (d / "info.json").write_text(json.dumps({"license": {"spdx": "CC-BY-4.0"}}))
        iconify[name] = d.parent
    return {**pkgs, "openmoji": root / "openmoji", "fluentui-emoji": root / "fluentui-emoji", **iconify}


@pytest.fixture
def style_packages(tmp_path):
    return make_style_packages(tmp_path / "pkgs")


def rows_of(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]


def has_style(e: dict, style: str) -> bool:
    if style in (*LIKE_EMOJIONE, "fxemoji"):
        return e["unified"] in (FXEMOJI if style == "fxemoji" else EMOJIONE)
    if style in FLUENT:
        return e["unified"] in FLUENT[style]
    return style == "openmoji" or e[f"has_img_{'google' if style == 'noto' else 'twitter'}"]


def test_styles_layout_metadata_and_split(style_packages, tmp_path):
    out = tmp_path / "emoji"
    m = emoji.build_styles_from_packages(style_packages, out, versions={"openmoji": "x"})
    names = {e["unified"]: (e, cldr) for e, cldr in V6_ENTRIES if e["category"] != "Component"}
    expected = {"train": {}, "test": {}}
    for style in STYLES5:
        for code, (e, _) in names.items():
            if has_style(e, style):
                held = expected_heldout(code, style)
                expected["test" if held else "train"][f"{style}/{e['image']}"] = (code, held)
    assert expected["test"][f"noto/{PAIRED.lower()}.png"] == (PAIRED, "pair")  # the rule does separate them
    assert f"fluent_flat/{PAIRED.lower()}.png" in expected["train"]
    assert all(f"{s}/{HELD.lower()}.png" in expected["test"] for s in STYLES5)
    for split, want in expected.items():
        rows = rows_of(out, split)
        assert {r["file_name"]: (r["unified"], r.get("heldout")) for r in rows} == want
        assert files(out / split) == set(want)  # every image has exactly one row
        for r in rows:
            e, cldr = names[r["unified"]]
            assert r["unicode_name"] == e["name"].lower() and r["category"] == e["category"] and r["text"] == cldr.lower()
        assert split == "test" or not any("heldout" in r for r in rows)
        ds = captioned_image_folder(out / split, 8)  # the training loader takes it as it is
        assert ds.classes == sorted(STYLES5) and len(ds) == len(want)
    assert m["counts"]["test"] == {s: sum(f.startswith(f"{s}/") for f in expected["test"]) for s in STYLES5}
    assert m["heldout_images"] == {h: sum(v[1] == h for v in expected["test"].values()) for h in ("emoji", "pair")}
    assert (m["match"]["twemoji"]["matched"], m["match"]["fluent_modern"]["unmatched"]) == (7, 2)
    assert m["match"]["fluent_flat"]["unmatched_by_category"] == {"Flags": 1}
    assert {"CC BY-SA 4.0", "MIT"} <= {w for v in m["licences"].values() for w in ("CC BY-SA 4.0", "MIT") if w in v}
    unmatched = json.loads((out / "unmatched.json").read_text())
    assert [e["unified"] for e in unmatched["fluent_modern"]["emoji"]] == [PAIRED, FLAG]
    assert unmatched["fluent_flat"]["unused_files"] == ["mystery-object.svg"]  # cat-face-light: a skin tone
    assert unmatched["twemoji"] == {"emoji": [{"unified": FLAG, "text": "united states flag", "category": "Flags"}],
                                    "unused_files": []}
    assert (m["match"]["emojione"]["matched"], m["match"]["emojione"]["unmatched"]) == (3, 5)
    assert unmatched["emojione"]["unused_files"] == ["mystery-icon", "traffic-light"]  # the tone: a variation
    assert {e["unified"] for e in unmatched["emojione"]["emoji"]} == {PAIRED, BUNNY, BUNNY_W, "263A-FE0F", "1F6A5"}
    assert "CC BY 4.0" in m["licences"]["emojione"] and "CC BY 4.0" in m["licences"]["fxemoji"]
    assert "Apache-2.0" in m["licences"]["noto_v1"] and "CC BY-SA 4.0" in m["licences"]["emojione_v1"]
    assert m["match"]["noto_v1"] == m["match"]["emojione_v1"] == m["match"]["emojione"]
    assert (m["match"]["fxemoji"]["matched"], unmatched["fxemoji"]["unused_files"]) == (3, ["mysteryicon"])
    with Image.open(out / "test" / "emojione" / f"{HELD.lower()}.png") as im:  # the icon set's own 4x4 box
        assert im.mode == "RGB" and im.size == (64, 64)
        assert im.getpixel((8, 32)) == (255, 255, 255) and im.getpixel((40, 32)) == (0, 255, 0)
    assert json.loads((out / "manifest.json").read_text()) == m and not list(tmp_path.glob("emoji.tmp-*"))
    split = "test" if expected_heldout("263A-FE0F", "fluent_flat") else "train"
    with Image.open(out / split / "fluent_flat" / "263a-fe0f.png") as im:  # 2:1 SVG, centred
        assert im.mode == "RGB" and im.size == (64, 64)
        assert im.getpixel((32, 4)) == (255, 255, 255) and im.getpixel((32, 32)) == (0, 0, 255)
    with Image.open(out / "train" / "openmoji" / f"{TRAINED.lower()}.png") as im:
        assert im.mode == "RGB" and im.size == (64, 64)
        assert im.getpixel((4, 32)) == (255, 255, 255) and im.getpixel((40, 32)) == (255, 0, 0)
        assert im.getpixel((16, 32)) == (255, 0, 0) and im.getpixel((15, 32)) == (255, 255, 255)


def test_styles_skin_tones_follow_base(style_packages, tmp_path):
    out = tmp_path / "emoji"
    emoji.build_styles_from_packages(style_packages, out, skin_tones=True)
    toned = [r for r in rows_of(out, "test") if r.get("base_unified") == HELD]
    assert sorted(r["file_name"] for r in toned) == sorted(  # no light file in fluent_modern, fxemoji
        f"{s}/{HELD.lower()}-1f3fb.png" for s in STYLES5 if s not in ("fluent_modern", "fxemoji"))
    assert {(r["unicode_name"], r["text"], r["unified"], r["heldout"]) for r in toned} == {
        ("cat face: light skin tone", "cat face: light skin tone", f"{HELD}-1F3FB", "emoji")}


def test_fluent_matching_order_and_tones():
    def e(unified, name):
        return {"unified": unified, "name": name, "short_names": [], "category": "x", "image": "x.png"}
    emojis = [e(BUNNY, "WOMAN WITH BUNNY EARS"), e(BUNNY_W, "WOMEN WITH BUNNY EARS"),
              e("1F6A8", "POLICE CARS REVOLVING LIGHT"), e("1F44B", "WAVING HAND SIGN"), e("1F600", "GRINNING FACE")]
    files = {"woman-with-bunny-ears", "person-with-bunny-ears", "police-car-light", "waving-hand-default",
             "waving-hand-light", "waving-hand-medium-light", "grinning-face", "grinning-face-2"}
    cldr = {"1F6A8": "police car light", "1F44B": "waving hand", "1F600": "woman with bunny ears"}  # last: a clash
    matched, unused = emoji_sources.match_files(emojis, files, cldr, emoji_sources.FLUENT_ALIASES)
    assert matched == {BUNNY: "person-with-bunny-ears", BUNNY_W: "woman-with-bunny-ears",
                       "1F6A8": "police-car-light", "1F44B": "waving-hand-default", "1F600": "grinning-face"}
    assert unused == ["grinning-face-2"]  # tone files are not "unused"; each file goes to one emoji
    assert emoji_sources.fluent_variant("waving-hand-default", "1F3FC", files) == "waving-hand-medium-light"
    assert emoji_sources.fluent_variant("waving-hand-default", "1F3FF", files) is None
    assert emoji_sources.fluent_variant("grinning-face", "1F3FB", files) is None


def test_styles_end_to_end_with_fake_npm(style_packages, tmp_path, monkeypatch, capsys):
    serve_tarballs(tmp_path, monkeypatch, style_packages)
    cache = tmp_path / "cache"
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:9]] == list(STYLES5) and lines[9].startswith("wrote")
    assert lines[4].startswith("fluent_modern: 6 of 8 emoji matched, 2 not (1 Smileys & Emotion, 1 Flags)")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["versions"] == {"emoji-datasource-google": "16.0.0", "emoji-datasource-twitter": "16.0.0",
                             "openmoji": "17.0.0", "fluentui-emoji": "1.3.0", "@iconify-json/emojione": "1.2.3",
                             "@iconify-json/fxemoji": "1.2.2", "@iconify-json/noto-v1": "1.2.5",
                             "@iconify-json/emojione-v1": "1.2.3"}
    assert (cache / "iconify-json-emojione-1.2.3.tgz").is_file()
    # a Fluent style alone still needs emoji.json and OpenMoji's CLDR names (fetched from the cache now)
    assert emoji.main(["--out", str(tmp_path / "flat"), "--cache_dir", str(cache), "--styles", "fluent_flat"]) == 0
    assert json.loads((tmp_path / "flat" / "manifest.json").read_text())["match"]["fluent_flat"]["matched"] == 7
    assert {p.parent.name for p in (tmp_path / "flat").rglob("*.png")} == {"fluent_flat"}


def test_renderer_missing_fails_before_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "resvg_py", None)  # what `import resvg_py` meets when not installed
    monkeypatch.setattr(shutil, "which", lambda *a, **k: pytest.fail("npm must not be looked for"))
    assert emoji.main(["--out", str(tmp_path / "out"), "--styles", "noto,openmoji"]) == 2
    err = capsys.readouterr().err
    assert "SVG renderer missing: pip install resvg-py" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--styles", "google"], ["--layout", "categories", "--styles", "noto"],
                                  ["--styles", "noto,noto"], ["--layout", "grid"]])
def test_bad_styles_arguments(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        emoji.main(["--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("break_it, styles, message", [
    (lambda p: p.pop("openmoji"), ["openmoji"], "style openmoji needs the openmoji package"),
    (lambda p: [p.pop(k) for k in list(p) if k.startswith("emoji-datasource")], ["openmoji"],
     "no emoji-datasource package"),
    (lambda p: (p["openmoji"] / "package" / "data" / "openmoji.json").unlink(), ["noto"],
     "has no openmoji.json: not an openmoji package"),
    (lambda p: shutil.rmtree(p["fluentui-emoji"] / "package" / "icons" / "modern"), ["fluent_modern"],
     "has no icons/modern/: not a fluentui-emoji package"),
    (lambda p: (p["fluentui-emoji"] / "package" / "icons" / "flat" / "enraged-face.svg").write_text("<svg"),
     ["noto", "fluent_flat"], "cannot render"),
    (lambda p: p.pop("@iconify-json/emojione"), ["emojione"], "style emojione needs the @iconify-json/emojione"),
    (lambda p: (p["@iconify-json/emojione"] / "package" / "icons.json").write_text("[1]"), ["emojione"],
     "expected an Iconify icon set"),
    (lambda p: (p["@iconify-json/emojione"] / "package" / "icons.json").unlink(), ["emojione"],
     "has no icons.json: not a @iconify-json/emojione package"),
    (lambda p: (p["@iconify-json/emojione"] / "package" / "icons.json").write_text(
        json.dumps({**ICONIFY, "icons": {"grinning-face": {"body": "<rect"}}})), ["emojione"], "cannot render an icon"),
])
def test_bad_packages(style_packages, tmp_path, break_it, styles, message):
    break_it(style_packages)
    with pytest.raises(emoji.EmojiError, match=message) as e:
        emoji.build_styles_from_packages(style_packages, tmp_path / "out", styles)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_keyword_captions_share_words_in_training_only(style_packages, tmp_path):
    """--keywords: one extra caption row per CLDR keyword for each training image; test keeps one row each."""
    data = style_packages["openmoji"] / "package" / "data" / "openmoji.json"
    entries = json.loads(data.read_text())
    tags = {TRAINED: "face, Grin, , face", HELD: "cat, face, pet"}  # messy on purpose: case, blanks, repeats
    data.write_text(json.dumps([{**o, "tags": tags[o["hexcode"]]} if o["hexcode"] in tags else o for o in entries]))
    out = tmp_path / "kw"
    m = emoji.build_styles_from_packages(style_packages, out, keywords=True)
    train, test = rows_of(out, "train"), rows_of(out, "test")
    extra = [r for r in train if r.get("keyword")]
    trained_files = sorted(r["file_name"] for r in train if r["unified"] == TRAINED and not r.get("keyword"))
    assert trained_files and sorted(r["file_name"] for r in extra if r["text"] == "grin") == trained_files
    assert {r["text"] for r in extra} == {"face", "grin"}  # the held-out cat face adds none
    assert m["keyword_captions"] == len(extra) == 2 * len(trained_files)
    assert not any(r.get("keyword") for r in test)
    assert next(r for r in test if r["unified"] == HELD)["keywords"] == ["cat", "face", "pet"]
    assert len(test) == len(files(out / "test"))  # one row per test image: the evaluation pairs are unchanged
    ds = captioned_image_folder(out / "train", 8)
    assert len(ds.captions) == len(train) and "grin" in ds.captions
    capped = emoji.build_styles_from_packages(style_packages, tmp_path / "capped", keywords=True, max_keywords=1)
    assert {r["text"] for r in rows_of(tmp_path / "capped", "train") if r.get("keyword")} == {"face"}  # the shared one
    assert capped["keyword_captions"] == len(trained_files)
    assert emoji.main(["--out", str(tmp_path / "x"), "--max_keywords", "2"]) == 2  # needs --keywords
    weighted = emoji.build_styles_from_packages(style_packages, tmp_path / "weighted", keywords=True, max_keywords=1,
                                                name_repeats=3)
    rows = rows_of(tmp_path / "weighted", "train")
    names = [r for r in rows if not r.get("keyword")]
    assert len(names) == 3 * len({r["file_name"] for r in names})  # each image's name row three times
    assert weighted["keyword_captions"] == len(trained_files) and weighted["images"] == capped["images"]
    assert len(rows_of(tmp_path / "weighted", "test")) == len(test)  # the test split is unchanged
    for bad in (["--name_repeats", "2"], ["--keywords", "--name_repeats", "0"]):
        assert emoji.main(["--out", str(tmp_path / "x"), *bad]) == 2
    for bad in ({"name_repeats": 0}, {"max_keywords": 0}, {"keywords": False, "name_repeats": 2}):  # the library too
        with pytest.raises(emoji.EmojiError, match="whole number >= 1"):
            emoji.build_styles_from_packages(style_packages, tmp_path / "y", **{"keywords": True, **bad})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing anything
    (style_packages.pop("openmoji"), style_packages.pop("fluentui-emoji"))
    with pytest.raises(emoji.EmojiError, match="need the openmoji package"):
        emoji.build_styles_from_packages(style_packages, tmp_path / "none", styles=("noto",), keywords=True)
