"""training.emoji on tiny fake emoji-datasource packages (no network; a fake `npm` where one is needed)."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from training import emoji

STYLES = ("google", "twitter")


def held_out(code: str) -> bool:
    return zlib.crc32(code.encode()) % 100 < 10


def find_code(pred, start=0x1F300) -> str:
    return next(f"{c:X}" for c in range(start, start + 100_000) if pred(f"{c:X}"))


# a base emoji that is held out although its skin variation's own code would not be: proves the
# split follows the BASE code; plus a base that is in train
HELD = find_code(lambda c: held_out(c) and not held_out(f"{c}-1F3FB"))
TRAIN = find_code(lambda c: not held_out(c) and c != HELD)


def entry(unified, category, skins=(), twitter=True):
    e = {"name": unified, "unified": unified, "image": f"{unified.lower()}.png", "category": category,
         "short_names": [unified.lower()], "has_img_google": True, "has_img_twitter": twitter}
    if skins:
        e["skin_variations"] = {t: {"unified": f"{unified}-{t}", "image": f"{unified.lower()}-{t.lower()}.png",
                                    "has_img_google": True, "has_img_twitter": True} for t in skins}
    return e


ENTRIES = [
    entry(TRAIN, "Smileys & Emotion"),
    entry(HELD, "People & Body", skins=["1F3FB"]),
    entry("1F3FB", "Component"),
    entry("1F1FA-1F1F8", "Flags", twitter=False),  # no twitter image: skipped for that style only
]


def make_package(root: Path, style: str) -> Path:
    """root/package/{emoji.json, img/<style>/64/*.png}: 4x4 RGBA, pixel (0,0) transparent,
    (1,0) half-transparent blue, the rest opaque red."""
    img_dir = root / "package" / "img" / style / "64"
    img_dir.mkdir(parents=True)
    (root / "package" / "emoji.json").write_text(json.dumps(ENTRIES))
    for e in ENTRIES:
        for v in [e, *e.get("skin_variations", {}).values()]:
            if v[f"has_img_{style}"]:
                im = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
                im.putpixel((0, 0), (0, 0, 0, 0))
                im.putpixel((1, 0), (0, 0, 255, 128))
                im.save(img_dir / v["image"])
    return root


@pytest.fixture
def packages(tmp_path):
    return {s: make_package(tmp_path / f"pkg-{s}", s) for s in STYLES}


def files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


def test_layout_split_and_compositing(packages, tmp_path):
    out = tmp_path / "emoji"
    m = emoji.build_from_packages(packages, out, version="x")
    t, h = TRAIN.lower(), HELD.lower()
    assert files(out) == {
        f"train/smileys_and_emotion/google_{t}.png", f"train/smileys_and_emotion/twitter_{t}.png",
        f"test/people_and_body/google_{h}.png", f"test/people_and_body/twitter_{h}.png",
        "train/flags/google_1f1fa-1f1f8.png" if not held_out("1F1FA-1F1F8") else "test/flags/google_1f1fa-1f1f8.png",
    }  # Component dropped, no skin tones, no twitter flag
    assert json.loads((out / "categories.json").read_text()) == {
        "flags": "Flags", "people_and_body": "People & Body", "smileys_and_emotion": "Smileys & Emotion"}
    assert m["counts"]["test"]["people_and_body"] == 2 and m["skin_tones"] is False
    assert json.loads((out / "manifest.json").read_text()) == m
    assert "CC-BY 4.0" in m["licences"]["twitter"] and "Apache-2.0" in m["licences"]["google"]
    assert not list(tmp_path.glob("emoji.tmp-*"))
    with Image.open(out / f"train/smileys_and_emotion/twitter_{t}.png") as im:
        assert im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
        assert all(abs(a - b) <= 1 for a, b in zip(im.getpixel((1, 0)), (127, 127, 255)))
        assert im.getpixel((2, 2)) == (255, 0, 0)


def test_skin_tones_follow_base_split(packages, tmp_path):
    out = tmp_path / "emoji"
    m = emoji.build_from_packages(packages, out, skin_tones=True)
    h = HELD.lower()
    for s in STYLES:  # the variation's own code says train; the base's says test
        assert (out / f"test/people_and_body/{s}_{h}-1f3fb.png").is_file()
    assert m["counts"]["test"]["people_and_body"] == 4 and m["skin_tones"] is True


def test_refuses_existing_out_unless_overwrite(packages, tmp_path, capsys):
    out = tmp_path / "emoji"
    (out / "old").mkdir(parents=True)
    with pytest.raises(emoji.EmojiError, match="already exists"):
        emoji.build_from_packages(packages, out)
    assert emoji.main(["--out", str(out)]) == 2  # refused before any fetch
    assert "--overwrite" in capsys.readouterr().err
    emoji.build_from_packages(packages, out, overwrite=True)
    assert not (out / "old").exists() and (out / "train").is_dir()


def test_missing_npm(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "npm not found" in err and "Node.js" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def fake_npm(tmp_path, monkeypatch, script: str):
    """Put an `npm` shell script first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_npm_pack_failure_shows_npm_error(tmp_path, monkeypatch, capsys):
    fake_npm(tmp_path, monkeypatch, """echo "npm error code ETARGET" >&2
echo "npm error notarget No matching version found for $2." >&2
echo "npm error A complete log of this run can be found in: /x.log" >&2
exit 1
""")
    assert emoji.main(["--out", str(tmp_path / "out"), "--version", "99.0.0"]) == 2
    err = capsys.readouterr().err
    assert "ETARGET: notarget No matching version found for emoji-datasource-google@99.0.0" in err
    assert err.count("\n") == 1


def test_end_to_end_with_fake_npm(packages, tmp_path, monkeypatch):
    tarballs = tmp_path / "tarballs"
    tarballs.mkdir()
    for s, d in packages.items():
        with tarfile.open(tarballs / f"emoji-datasource-{s}.tgz", "w:gz") as tar:
            tar.add(d / "package", arcname="package")
    fake_npm(tmp_path, monkeypatch, f"""name="${{2%@*}}"; ver="${{2##*@}}"
cp "{tarballs}/$name.tgz" "./$name-$ver.tgz" && echo "$name-$ver.tgz"
""")
    cache = tmp_path / "cache"
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(cache), "--styles", "twitter"]) == 0
    assert (cache / "emoji-datasource-twitter-16.0.0.tgz").is_file()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["version"] == "16.0.0" and m["styles"] == ["twitter"] and "google" not in m["licences"]
    assert files(tmp_path / "out") == {f"train/smileys_and_emotion/twitter_{TRAIN.lower()}.png",
                                       f"test/people_and_body/twitter_{HELD.lower()}.png"}


def write_tgz(path: Path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members, message", [
    ({"package/README.md": b"hi"}, "no emoji.json"),
    ({"package/emoji.json": json.dumps(ENTRIES).encode()}, "images missing"),
    ({"package/emoji.json": b"[]", "package/img/google/64/a.png": b"x",  # a.png makes the path resolvable
      "package/img/google/64/../../../../../evil.png": b"x"}, "cannot unpack"),
])
def test_bad_tarball(tmp_path, capsys, members, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_tgz(cache / "emoji-datasource-google-16.0.0.tgz", members)  # cached: npm is not called
    assert emoji.main(["--out", str(tmp_path / "out"), "--cache_dir", str(cache), "--styles", "google"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("evil.png")) and not (tmp_path / "out").exists()
